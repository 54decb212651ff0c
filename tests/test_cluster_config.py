"""cluster.yaml, the file `ray up` takes: valid for Ray's cluster launcher, and the serve
command it documents composes with this project's config."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from dwm.config import compose

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_the_cluster_file_passes_rays_launcher_schema():
    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on a bad key or value
    assert config["head_node_type"] in config["available_node_types"]
    assert any(t.get("min_workers", 0) >= 1 for name, t in config["available_node_types"].items() if name != "head")
    # The 8-GPU machines users rent, each type with autoscaling bounds inside the cluster's.
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert {t["node_config"]["InstanceType"] for t in workers.values()} >= {"p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge"}
    assert all(0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers.values())


def test_the_documented_serve_command_composes():
    text = CLUSTER.read_text()
    command = " ".join(line.lstrip("# ").rstrip("\\\\ ") for line in text.splitlines()[:12] if line.startswith("#"))
    match = re.search(r"serve run -a auto deployments:app (.*?)'", command)
    assert match, "cluster.yaml documents the serve run command"
    overrides = match.group(1).split()
    cfg = compose(overrides)
    assert cfg.pipeline.bands == 4 and cfg.serve.pipelines == 2 and cfg.serve.stage.num_gpus is None
    assert cfg.model.name == "ctsd_35_xs" and cfg.device == "cuda"
