"""Write `deployments/serve_config.yaml`, the app as a Serve config file for `serve deploy`:

    .venv/bin/python -m deployments.serve_config             # rewrites deployments/serve_config.yaml
    serve deploy deployments/serve_config.yaml               # on a running Ray cluster (`ray start`, `ray up`)
    serve status

It is what `serve build deployments.default:app` writes (every deployment with its replicas,
Ray resources and shutdown and health-check settings from `conf/`), with three changes:
- HTTP on loopback (`http_options.host: 127.0.0.1`; `serve build` writes 0.0.0.0, open to the
  network): put your own proxy in front, or set the host yourself where that is wanted;
- the application is named `dwm`;
- it is imported through the builder, `import_path: deployments:app` with `args: {}`: add
  overrides there (`args: {world.map: merge, pipeline.guidance: 1.0}`), as after `serve run`.
A test keeps the file equal to a fresh build.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

PATH = Path(__file__).resolve().parent / "serve_config.yaml"
HOST = "127.0.0.1"
NAME = "dwm"


def build() -> str:
    """The text of the config file (see the module docstring)."""
    serve = Path(sys.executable).with_name("serve")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "built.yaml"
        result = subprocess.run([str(serve), "build", "deployments.default:app", "-o", str(out)],
                                capture_output=True, text=True, cwd=PATH.parent.parent)
        if result.returncode != 0:
            raise RuntimeError(f"serve build failed:\n{result.stderr[-3000:]}")
        built = out.read_text()
    config = yaml.safe_load(built)
    config["http_options"]["host"] = HOST
    (app,) = config["applications"]
    app["name"] = NAME
    app["import_path"] = "deployments:app"
    app = {**{k: v for k, v in app.items() if k != "deployments"}, "args": {}, "deployments": app["deployments"]}
    config["applications"] = [app]
    header = ("# `serve build deployments.default:app` with HTTP on loopback, the app named\n"
              f"# `{NAME}` and imported through the builder (add overrides under `args`).\n"
              "# Rewritten by `python -m deployments.serve_config`; deploy with `serve deploy deployments/serve_config.yaml`.\n\n")
    return header + yaml.safe_dump(config, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, default=PATH, help="where to write it (default: %(default)s)")
    args = parser.parse_args(argv)
    args.output.write_text(build())
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
