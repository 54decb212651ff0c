"""`python -m deployments [key=value ...]`: the Serve app on this machine, on serve.http_host:serve.http_port.

The same app as `serve run deployments:app key=value ...` (which always listens on
127.0.0.1:8000), with the listening address from the config and no Ray dashboard. Ctrl-C or
SIGTERM shuts everything down.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from dwm.config import ConfigError, compose


def _as_dict(argv: list[str]) -> dict[str, str]:
    overrides = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"cannot parse the override {arg!r}: write key=value, e.g. world.map=merge")
        overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local server: no Ray token file
    import ray
    from ray import serve

    from deployments import app

    try:
        overrides = _as_dict(sys.argv[1:] if argv is None else argv)
        cfg = compose(overrides)
        application = app(overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    host, port = str(cfg.serve.http_host), int(cfg.serve.http_port)
    ray.init(include_dashboard=False, log_to_driver=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application)
        print(f"serving on http://{host}:{port}/  (API docs at /docs; Ctrl-C stops)", file=sys.stderr)
        stop.wait()
    finally:
        print("shutting down", file=sys.stderr)
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
