"""The Ray Serve layer: `serve run deployments:app [key=value ...]`.

`app` composes `conf/` with the arguments as Hydra overrides and binds the topology
(see `deployments.builder`); `dwm/` is the library it runs and never imports Ray.
"""

from deployments.builder import app

__all__ = ["app"]
