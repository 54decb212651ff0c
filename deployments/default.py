"""The app with the default config, bound at import: for `serve build`, which needs an
application object rather than a builder.

    serve build deployments.default:app -o serve_config.yaml
    serve deploy serve_config.yaml        # on a running Ray cluster

In the written config, `import_path: deployments:app` with `args: {world.map: merge, ...}`
composes the config with those overrides instead (Serve passes `args` to the builder).
"""

from deployments.builder import app as build

app = build({})
