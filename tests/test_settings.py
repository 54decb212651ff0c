"""The config groups' schemas: every shipped config passes them, and a wrong value stops the
composition with one line naming the key, the value and what is allowed."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from deployments.settings import ServeSettings
from dwm.config import ConfigError, compose, group_options
from dwm.settings import GROUPS, check_groups


@pytest.mark.parametrize("model", group_options("model"))
@pytest.mark.parametrize("world", group_options("world"))
def test_every_shipped_config_passes_its_schemas(model, world):
    plain = OmegaConf.to_container(compose([f"model={model}", f"world={world}"]))
    assert check_groups(plain, {**GROUPS, "serve": ServeSettings}) is None


@pytest.mark.parametrize(
    "override, line",
    [
        ("pipeline.steps=0", "pipeline.steps=0: must be greater than or equal to 1"),
        ("pipeline.batch_bands=1", "pipeline.batch_bands=1: must be true or false"),
        ("pipeline.guidance=true", "pipeline.guidance=true: must be a valid number"),
        ("pipeline.resolution=[176]", "pipeline.resolution=[176]: must have at least 2 items"),
        ("pipeline.fps=-10", "pipeline.fps=-10: must be greater than 0"),
        ("stream.crf=99", "stream.crf=99: must be less than or equal to 51"),
        ("stream.preset=warp", "stream.preset=warp: must be 'ultrafast', 'superfast'"),
        ("stream.rtsp.transport=pigeon", "stream.rtsp.transport=pigeon: must be 'tcp' or 'udp'"),
        ("stream.rtsp.url=http://host/x", "stream.rtsp.url=http://host/x: must match"),
        ("+pipeline.bogus=1", "pipeline.bogus: no such config key"),
    ],
)
def test_a_wrong_value_stops_the_composition_with_one_line_naming_it(override, line):
    with pytest.raises(ConfigError) as err:
        compose([override])
    message = str(err.value)
    assert line in message and "\n" not in message, message


def test_several_wrong_values_are_all_named():
    with pytest.raises(ConfigError) as err:
        compose(["pipeline.steps=0", "stream.gop=0"])
    assert "pipeline.steps=0" in str(err.value) and "stream.gop=0" in str(err.value)


@pytest.mark.parametrize(
    "change, line",
    [
        ({"clock": "sundial"}, "serve.clock=sundial: must be 'lockstep' or 'realtime'"),
        ({"http_port": 70000}, "serve.http_port=70000: must be less than or equal to 65535"),
        ({"stage": {"placement": "ANYWHERE"}}, "serve.stage.placement=ANYWHERE: must be 'PACK'"),
        ({"stage": {"compiled_graph": "sometimes"}}, "serve.stage.compiled_graph=sometimes: must be true or false or must be 'auto'"),
        ({"world": {"num_cpus": -1}}, "serve.world.num_cpus=-1: must be greater than or equal to 0"),
        ({"trim_every_s": 0}, "serve.trim_every_s=0: must be greater than 0"),
    ],
)
def test_the_serve_group_names_a_wrong_value(change, line):
    plain = OmegaConf.to_container(compose([]))
    serve = plain["serve"]
    for key, value in change.items():
        if isinstance(value, dict):
            serve[key].update(value)
        else:
            serve[key] = value
    assert line in check_groups(plain, {"serve": ServeSettings})
