"""`python -m deployments [--address ADDR] [--name NAME] [key=value ...]`: the Serve app, listening
on serve.http_host:serve.http_port.

The same app as `serve run deployments:app key=value ...` (which listens on 127.0.0.1:8000), with
the listening address from the config.

Without an address (`--address`, or the RAY_ADDRESS environment variable, as `serve run -a`
takes it) it starts a Ray of its own, never one already running on the machine: every Ray port
on 127.0.0.1 only, Ray's token authentication as Ray sets it (on by default; RAY_AUTH_MODE
chooses), no dashboard. Ctrl-C or SIGTERM then stops the app, Serve and that Ray.

With an address (`auto`: the Ray `ray start` started here; `HOST:PORT`: a cluster's head) it
deploys the app on that Ray under its own name (`--name`, default `dwm`), on the HTTP address
of the Serve already running there, if one is; Ctrl-C deletes only that app and leaves Serve
and Ray running.

A listener already on serve.http_host:serve.http_port stops it before anything starts (exit
code 2, as for a bad override).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import signal
import socket
import sys
import threading
from pathlib import Path

# Ray on Linux takes the machine's network address as the node's address, even for
# `ray.init(_node_ip_address="127.0.0.1")`, and its servers listen on every interface. With
# this set to 0 (read when `ray` is imported) the node's address is 127.0.0.1, as on macOS and
# Windows, and every Ray process listens there only: GCS, raylet (node and object manager),
# workers, dashboard and runtime-env agents, metrics.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def serve_grpc_on_loopback() -> None:
    """Ray's worker setup hook where this command starts its own Ray (runs in every worker).

    A Serve replica starts a server for calls between deployments on every interface
    (`ray.serve._private.replica`: `add_port_to_grpc_server(server, "[::]:0")`, whatever the
    node's address); here it listens on 127.0.0.1, the node's address, where the other replicas
    call it. A Ray without that code is left as it is."""
    try:
        from ray._common import tls_utils
    except ImportError:
        return
    add_port = getattr(tls_utils, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "loopback_only", False):
        return

    def add_loopback_port(server, address: str) -> int:
        host, _, port = address.rpartition(":")
        if host in ("[::]", "::", "0.0.0.0", ""):
            address = f"127.0.0.1:{port}"
        return add_port(server, address)

    add_loopback_port.loopback_only = True
    tls_utils.add_port_to_grpc_server = add_loopback_port
    replica = sys.modules.get("ray.serve._private.replica")  # imported already: its own reference
    if replica is not None and hasattr(replica, "add_port_to_grpc_server"):
        replica.add_port_to_grpc_server = add_loopback_port


def _as_dict(argv: list[str]) -> dict[str, str]:
    from dwm.config import ConfigError

    overrides = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"cannot parse the override {arg!r}: write key=value, e.g. world.map=merge")
        overrides[key] = value
    return overrides


def app_overrides(overrides: dict[str, str]) -> dict[str, str]:
    """The overrides less the listening address, which is this command's and not the app's."""
    from deployments.builder import HTTP_KEYS

    return {k: v for k, v in overrides.items() if k.lstrip("+~") not in HTTP_KEYS}


def listening_sockets() -> list[tuple[str, int, set[int]]]:
    """(address, port, pids owning it) of every listening TCP socket of this machine's network
    namespace, from /proc (Linux; empty elsewhere). Pids are those whose file descriptors this
    user may read."""
    sockets: dict[int, tuple[str, int]] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A: LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.IPv4Address(raw) if width == 8 else ipaddress.IPv6Address(raw)
            sockets[int(fields[9])] = (str(ip), int(hex_port, 16))
    owners: dict[int, set[int]] = {inode: set() for inode in sockets}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inode = int(link[8:-1])
                    if inode in owners:
                        owners[inode].add(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return [(ip, port, owners[inode]) for inode, (ip, port) in sockets.items()]


def _command_line(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in args if a)
    return text if len(text) <= 80 else text[:77] + "..."


def http_address_problem(host: str, port: int) -> str | None:
    """Why Serve could not listen on host:port, or None where it can: tried by binding it here,
    as the HTTP proxy would, and naming what listens there where this machine says."""
    if not (isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535):
        return f"serve.http_port={port}: must be a port number in [1, 65535]"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return f"serve.http_host={host}: cannot resolve it ({err.strerror})"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no obstacle
            try:
                s.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    users = sorted({
                        f"pid {pid} ({_command_line(pid)}) on {ip}:{p}"
                        for ip, p, pids in listening_sockets() if p == port for pid in pids
                    })
                    who = f": {'; '.join(users)}" if users else " (by a process this user cannot see)"
                    return (f"cannot listen on {host}:{port} (serve.http_host:serve.http_port), "
                            f"the port is in use{who}. Stop that, or choose another port: serve.http_port=...")
                return f"cannot listen on {host}:{port} (serve.http_host:serve.http_port): {err.strerror}"
    return None


def _serve_http_address(host: str, port: int) -> tuple[str, int]:
    """Where the Serve this process is connected to listens (host, port as given where Ray
    does not say)."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        return str(http.host), int(http.port)
    except Exception:  # a private API: another Ray may not have it
        return host, port


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deployments",
        description="Run the Serve app; key=value arguments are config overrides (conf/).",
    )
    parser.add_argument(
        "--address", "-a", default=os.environ.get("RAY_ADDRESS") or None,
        help="Ray to deploy on: 'auto' (the one `ray start` started here) or HOST:PORT of a "
             "cluster's head; default RAY_ADDRESS, else a new Ray of its own on 127.0.0.1",
    )
    parser.add_argument("--name", default="dwm", help="the Serve app's name (default dwm)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    from dwm.config import ConfigError, compose  # here: Ray's workers import this module (the setup hook)

    args = _parse(sys.argv[1:] if argv is None else argv)
    own_ray = args.address in (None, "local")
    try:
        overrides = _as_dict(args.overrides)
        cfg = compose(overrides)
        host, port = str(cfg.serve.http_host), cfg.serve.http_port
        # Only where this command starts Serve itself: on another Ray, a Serve already running
        # there may own the port (or it is another machine's).
        problem = http_address_problem(host, port) if own_ray else None
        if problem:
            raise ConfigError(problem)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if own_ray:
        os.environ[LOOPBACK_ONLY_ENV] = "0"  # before `ray` is imported (see its comment)
    import ray
    from ray import serve

    from deployments import app

    try:
        application = app(app_overrides(overrides))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if own_ray:
        ray.init(address="local", include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": "deployments.__main__.serve_grpc_on_loopback"})
    else:
        ray.init(address=args.address, log_to_driver=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own
        signal.signal(sig, lambda *_: stop.set())
    deployed = False
    try:
        serve.start(http_options={"host": host, "port": int(port)})
        if args.name in serve.status().applications:
            print(f"error: a Serve app named {args.name!r} already runs on that Ray; "
                  "choose another name with --name", file=sys.stderr)
            return 2
        deployed = True
        serve.run(application, name=args.name, route_prefix="/")
        if not own_ray:  # a Serve already running there keeps its own HTTP address
            host, port = _serve_http_address(host, port)
        where = f"[{host}]" if ":" in str(host) else host
        print(f"serving {args.name!r} on http://{where}:{port}/  (API docs at /docs; Ctrl-C stops)",
              file=sys.stderr)
        stop.wait()
    finally:
        print("shutting down", file=sys.stderr)
        try:
            if own_ray:
                serve.shutdown()  # the app, Serve, and then (ray.shutdown) the Ray it started
            elif deployed:
                serve.delete(args.name)  # only its own app: Serve and Ray are others' too
        finally:
            ray.shutdown()  # on another's Ray: disconnects
    return 0


if __name__ == "__main__":
    sys.exit(main())
