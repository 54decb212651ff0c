"""What the tests share: one Ray instance per test process, and one Serve on it.

`make test` runs two test processes (pytest-xdist, `--dist loadfile`: each takes whole test
files); each starts its own Ray where its files need one, so no test ever sees the other's.

Starting Ray, and Serve on it, takes seconds each time, and so does stopping them; on a
loaded 2-core machine much more. So the tests that need Ray take it from `ray_runtime`:

- `ray_runtime.local()`: one local Ray for the test process (2 CPUs, as the CI machine, and 4
  declared GPUs for the denoiser pool's stage actors; the model runs on the CPU).
- `ray_runtime.serve_app(app, name)`: runs a Serve app on it (one HTTP proxy on a free port,
  started once) for as long as the `with` block lasts, then deletes it; the next app gets
  the same port. One app at a time: each takes the route prefix `/`, as with `serve run`.
- `ray_runtime.cluster(...)`: a multi-node `ray.cluster_utils.Cluster` for the tests that
  need one (marked `ray_cluster`). The driver can be connected to one Ray only, so the local
  one is stopped first; the modules are ordered (see `pytest_collection_modifyitems`) so that
  each kind starts once.

Torch in every process of the run (this one, the subprocesses, Ray's workers) waits for work
passively (OMP_WAIT_POLICY below).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set before torch is first imported (here, in the subprocesses and in Ray's workers, which
# inherit it). OpenMP's threads spin while they wait for work by default: where a core is
# shared with another busy process (Ray's actors, a subprocess, anything else on a loaded CI
# machine) the spinning threads take the core from the ones with work, and a model call
# became ten times slower. Passive waiting keeps the thread count, and so the results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Ray 2.60 turns token authentication on by default; the tests talk plain HTTP to Serve.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Serve's controller kills an HTTP proxy that is not ready within 5 s; on a machine loaded by
# two test processes a proxy's start can take longer, and nothing here is served by a second.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CPUS = 2  # as the CI machine: the Serve apps' actors take fractions of them
LOCAL_GPUS = 4  # declared: test_pool places a pipeline's stage actors on distinct GPU ids
OBJECT_STORE = 256 * 2**20  # the default (30% of RAM) is far more than tests use
# Actors run the project from this checkout, whatever the worker's working folder.
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": str(ROOT)}}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "ray_cluster: starts a multi-node Ray cluster of its own; run after every other test",
    )


def pytest_collection_modifyitems(session, config, items):
    """Whole modules, in their order otherwise: first those without Ray, then those on the
    shared local Ray, then those with a cluster of their own. So the local Ray starts once and
    is idle as little as possible, and it is stopped once, for the cluster (the driver can be
    connected to one Ray only), rather than once per side of it."""

    def group(item) -> int:
        if item.get_closest_marker("ray_cluster") is not None:
            return 2
        return 1 if "ray_runtime" in item.fixturenames else 0

    groups: dict[object, int] = {}
    for item in items:
        groups[item.module] = max(groups.get(item.module, 0), group(item))
    items.sort(key=lambda item: groups[item.module])


class RayRuntime:
    """The Ray this test process is connected to: none, the shared local one, or a cluster."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self._cluster = None
        self._cluster_nodes: tuple[dict, list[dict], list] | None = None  # (head, workers, nodes)
        self._serve_port: int | None = None

    def local(self) -> None:
        """Connect to the shared local Ray, starting it on first use."""
        if self.kind == "local":
            return
        import ray

        self.stop()
        ray.init(
            # A new instance of our own, even where a cluster started elsewhere on this machine
            # (`ray start`, another run's Cluster) has left its address for ray.init to find.
            address="local",
            num_cpus=LOCAL_CPUS, num_gpus=LOCAL_GPUS, include_dashboard=False, log_to_driver=False,
            object_store_memory=OBJECT_STORE, runtime_env=RUNTIME_ENV,
        )
        self.kind = "local"

    @contextlib.contextmanager
    def serve_app(self, app, name: str) -> Iterator[str]:
        """Run the Serve application `app` (a bound `deployments.app(...)`) as `name` on the
        shared Ray; yields its base URL, and deletes the app afterwards."""
        from ray import serve

        from tests.waiting import free_port

        self.local()
        if self._serve_port is None:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            self._serve_port = port
        serve.run(app, name=name, route_prefix="/")
        try:
            yield f"http://127.0.0.1:{self._serve_port}"
        finally:
            serve.delete(name)

    def cluster(self, head: dict, workers: list[dict]) -> list:
        """Connect to a `ray.cluster_utils.Cluster` with these head node args and one dict of
        args per worker node, starting it unless the one running is that; returns the worker
        nodes."""
        import ray
        from ray.cluster_utils import Cluster

        if self.kind == "cluster" and self._cluster_nodes[:2] == (head, workers):
            return self._cluster_nodes[2]
        self.stop()
        c = Cluster(initialize_head=True, head_node_args=head)
        self._cluster, self.kind = c, "cluster"
        nodes = [c.add_node(**args) for args in workers]
        ray.init(address=c.address, log_to_driver=False, runtime_env=RUNTIME_ENV)
        c.wait_for_nodes()
        self._cluster_nodes = (head, workers, nodes)
        return nodes

    def stop(self) -> None:
        if self.kind is None:
            return
        import ray
        from ray import serve

        try:
            serve.shutdown()  # a no-op where no Serve ran
            ray.shutdown()
        finally:
            if self._cluster is not None:
                self._cluster.shutdown()
            self.kind, self._cluster, self._cluster_nodes, self._serve_port = None, None, None, None


@pytest.fixture(scope="session")
def ray_runtime() -> Iterator[RayRuntime]:
    runtime = RayRuntime()
    try:
        yield runtime
    finally:
        runtime.stop()
