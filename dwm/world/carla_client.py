"""The connection to a Carla server: the client, its version check, the town, synchronous mode,
and reconnecting with back-off when the server goes away.

We are the only client that ticks: the world runs in synchronous mode with a fixed time step,
and the traffic manager (on its own port) in synchronous mode with it. Whatever settings the
world had are put back on `release`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from dwm.world.base import WorldUnavailableError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "world=carla needs the Carla Python client: pip install -e .[carla] "
    "(carla 0.9.16 wheels are on PyPI for Python 3.10 to 3.12, x86_64 Linux and Windows; "
    "a 0.9.15 server accepts that client)"
)
SUPPORTED_SERVERS = ("0.9.15", "0.9.16")
SERVER_HINT = "start one with `CarlaUE4.sh -RenderOffScreen -quality-level=Low`, or set world.host / world.port"


def import_carla():
    """The `carla` module, or an ImportError that says how to install it."""
    try:
        import carla
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return carla


def is_connection_error(err: BaseException) -> bool:
    """Carla reports a lost or absent server as a RuntimeError about a time-out or the connection."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(w in text for w in ("time-out", "timeout", "connect", "rpc", "socket"))


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:3]).split("-")[0]


@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int
    tm_port: int
    timeout: float  # s for each client call

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def server_address(host, port, tm_port, timeout) -> ServerAddress:
    """Validated connection settings; ValueError naming the config key otherwise."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"world.host={host!r} must be a host name or address, e.g. 127.0.0.1")
    for key, value in (("port", port), ("tm_port", tm_port)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise ValueError(f"world.{key}={value!r} must be an integer TCP port in 1..65535")
    if port == tm_port or tm_port == port + 1:
        raise ValueError(f"world.tm_port={tm_port} clashes with the server's ports {port} and {port + 1}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"world.timeout={timeout!r} must be a positive number of seconds")
    return ServerAddress(host, port, tm_port, float(timeout))


class CarlaConnection:
    """One client on one server, holding the world in our synchronous mode.

    town: map to load (e.g. "Town10HD_Opt"; None keeps the loaded one); fixed_delta_seconds:
    s per tick; seed: the traffic manager's random seed.
    """

    def __init__(self, address: ServerAddress, town: str | None, fixed_delta_seconds: float, seed: int):
        self.address = address
        self.town = town
        self.fixed_delta_seconds = fixed_delta_seconds
        self.seed = seed
        self.client = self.world = self.traffic_manager = None
        self.server_version = ""
        self._previous_settings = None

    def connect(self) -> None:
        """Connect, check the version, load the town, take synchronous mode.
        WorldUnavailableError when no server answers."""
        carla = import_carla()
        client = carla.Client(self.address.host, self.address.port, 1)
        client.set_timeout(self.address.timeout)
        try:
            self.server_version = client.get_server_version()
        except RuntimeError as err:
            raise WorldUnavailableError(
                f"no Carla server answered at world.host={self.address.host} world.port={self.address.port} "
                f"within world.timeout={self.address.timeout:g} s ({err}); {SERVER_HINT}"
            ) from None
        self._check_version(client.get_client_version(), self.server_version)
        world = client.get_world()
        if self.town is not None:
            world = self._load_town(client, world)
        self.client, self.world = client, world
        self._previous_settings = world.get_settings()
        settings = world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = self.fixed_delta_seconds
        world.apply_settings(settings)
        self.traffic_manager = client.get_trafficmanager(self.address.tm_port)
        self.traffic_manager.set_synchronous_mode(True)
        self.traffic_manager.set_random_device_seed(self.seed)
        log.info("Carla %s at %s: %s in synchronous mode, %.3f s per tick", self.server_version, self.address,
                 world.get_map().name, self.fixed_delta_seconds)

    def _check_version(self, client_version: str, server_version: str) -> None:
        server = _minor(server_version)
        if server not in SUPPORTED_SERVERS:
            log.warning("Carla server %s is not one of the supported %s; trying anyway", server_version,
                        ", ".join(SUPPORTED_SERVERS))
        elif server != _minor(client_version):
            # The 0.9.16 wheel is the only one on PyPI for Python >= 3.10; a 0.9.15 server
            # prints a version warning for it and otherwise works for what we use.
            log.warning("Carla server %s with client %s: the server will warn about the version mismatch",
                        server_version, client_version)

    def _load_town(self, client, world):
        available = sorted(path.rsplit("/", 1)[-1] for path in client.get_available_maps())
        wanted = self.town.rsplit("/", 1)[-1]
        if wanted not in available:
            raise ValueError(f"world.town={self.town!r} is not a map of the server at {self.address}; "
                             f"available: {', '.join(available)} (or null to keep the loaded one)")
        if world.get_map().name.rsplit("/", 1)[-1] == wanted:
            return world
        log.info("loading %s on the Carla server", wanted)
        return client.load_world(wanted)

    def release(self) -> None:
        """Give the world back as we found it (asynchronous unless it was synchronous before)."""
        try:
            if self.traffic_manager is not None:
                self.traffic_manager.set_synchronous_mode(False)
            if self.world is not None and self._previous_settings is not None:
                self.world.apply_settings(self._previous_settings)
        finally:
            self.client = self.world = self.traffic_manager = None
            self._previous_settings = None


@dataclass
class Backoff:
    """When to try reconnecting: first after `first_delay_s`, then doubling up to `max_delay_s`."""

    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    attempts: int = 0
    next_attempt: float = 0.0  # time.monotonic() s
    down_since: float | None = None

    def __post_init__(self) -> None:
        for key in ("first_delay_s", "max_delay_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"world.reconnect.{key}={value!r} must be a number of seconds >= 0")
        if self.max_delay_s < self.first_delay_s:
            raise ValueError("world.reconnect.max_delay_s must be at least world.reconnect.first_delay_s")

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def lost(self) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since, self.attempts = now, 0
            self.next_attempt = now + self.first_delay_s

    def due(self) -> bool:
        return time.monotonic() >= self.next_attempt

    def failed(self) -> float:
        """One more attempt failed; returns the s until the next one."""
        self.attempts += 1
        delay = min(self.max_delay_s, self.first_delay_s * 2.0**self.attempts)
        self.next_attempt = time.monotonic() + delay
        return delay

    def wait(self) -> float:
        return max(0.0, self.next_attempt - time.monotonic())

    def recovered(self) -> None:
        self.down_since, self.attempts = None, 0


class ServerLink:
    """Calls to a server that may go away and come back, over one `CarlaConnection`.

    `with link.call(reconnected):` around client calls turns a lost connection into a
    `WorldUnavailableError` whose message says what happened and when the next attempt comes;
    the first call once `backoff` allows it reconnects, then runs `reconnected()` (the caller
    clears what it left on the server and sets up anew) before the calls themselves.
    """

    def __init__(self, connection: CarlaConnection, backoff: Backoff):
        self.connection = connection
        self.backoff = backoff
        self.closed = False  # set by the owner: every later call fails

    @property
    def down(self) -> bool:
        return self.backoff.down

    @contextlib.contextmanager
    def call(self, reconnected: Callable[[], None]):
        if self.closed:
            raise WorldUnavailableError("the Carla world is closed")
        if self.backoff.down:
            self._reconnect(reconnected)
        try:
            yield
        except RuntimeError as err:
            if isinstance(err, WorldUnavailableError) or not is_connection_error(err):
                raise
            self.backoff.lost()
            wait = self.backoff.wait()
            raise WorldUnavailableError(
                f"lost the Carla server at {self.connection.address} ({err}); reconnecting in {wait:.0f} s",
                retry_in=wait,
            ) from None

    def _reconnect(self, reconnected: Callable[[], None]) -> None:
        address, backoff = self.connection.address, self.backoff
        down_for = time.monotonic() - backoff.down_since
        if not backoff.due():
            wait = backoff.wait()
            raise WorldUnavailableError(
                f"the Carla server at {address} has been unreachable for {down_for:.0f} s; "
                f"next reconnection attempt in {wait:.0f} s", retry_in=wait)
        try:
            self.connection.connect()
            reconnected()
        except (WorldUnavailableError, RuntimeError) as err:
            delay = backoff.failed()
            raise WorldUnavailableError(
                f"the Carla server at {address} has been unreachable for {down_for:.0f} s; reconnection "
                f"attempt {backoff.attempts} failed ({err}); next one in {delay:.0f} s", retry_in=delay
            ) from None
        log.info("reconnected to the Carla server at %s after %.0f s", address, down_for)
        backoff.recovered()


def quietly(call: Callable[[], object]) -> None:
    """Cleanup goes on past one actor that is already gone (or a server that is)."""
    try:
        call()
    except RuntimeError as err:
        log.debug("ignored during cleanup: %s", err)
