"""`deployments/serve_config.yaml`, the app as a Serve config for `serve deploy`: equal to a
fresh `serve build` with its documented changes, valid for Serve, and safe by default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "deployments" / "serve_config.yaml"


def test_the_committed_serve_config_is_a_fresh_build_serve_accepts_listening_on_loopback(tmp_path):
    fresh = tmp_path / "serve_config.yaml"
    result = subprocess.run([sys.executable, "-m", "deployments.serve_config", "-o", str(fresh)],
                            cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert fresh.read_text() == COMMITTED.read_text(), (
        "deployments/serve_config.yaml is not what a build writes now: run `python -m deployments.serve_config`")
    config = ServeDeploySchema.model_validate(yaml.safe_load(COMMITTED.read_text()))
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    assert (app.name, app.import_path, app.args) == ("dwm", "deployments:app", {})
    # Every deployment of the app, with the replicas and resources the config gives them.
    assert {d.name for d in app.deployments} == {"Ingress", "SessionManager", "World", "QueueServer"}
