"""The Ray Serve layer: `serve run deployments:app [key=value ...]`.

`app` composes `conf/` with the arguments as Hydra overrides and binds the topology
(see `deployments.builder`); `dwm/` is the library it runs and never imports Ray.

`app` is loaded on first use: every Serve replica imports this package to find its class,
and the Ingress and World replicas need neither torch nor the model (importing them costs
several seconds of CPU per replica).
"""

__all__ = ["app"]


def __getattr__(name: str):
    if name == "app":
        from deployments.builder import app

        return app
    raise AttributeError(f"module 'deployments' has no attribute {name!r}")
