"""The config groups' schemas: what each key of `pipeline` and `stream` may hold.

`dwm.config.compose` checks every composed config against them, so a wrong value stops with
one line naming the key, the value and what is allowed, before anything is built. Hydra
already refuses a key that does not exist; these models refuse values of the wrong type or
out of range (strict: `true` is not a number, `"5"` is not a whole number once composed).
Rules that tie several keys together (steps divisible by window x bands, fps against the
world's tick) stay with the code that owns them and say so in their own messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PositiveInt = Annotated[int, Field(ge=1)]
Pixels = Annotated[int, Field(ge=8, le=4096)]
Size = Annotated[list[Pixels], Field(min_length=2, max_length=2)]  # [H, W]


class Schema(BaseModel):
    """A config group: no unknown keys, no conversions."""

    model_config = ConfigDict(extra="forbid", strict=True)


class PipelineSettings(Schema):
    steps: PositiveInt
    window: PositiveInt
    bands: PositiveInt
    batch_bands: bool
    guidance: Annotated[float, Field(ge=1.0)]
    cfg_parallel: bool
    shift: Annotated[float, Field(gt=0.0)]
    train_steps: PositiveInt
    resolution: Size
    output_size: Size
    text_interval: PositiveInt
    fps: Annotated[float, Field(gt=0.0)] | None


RtspTransport = Literal["tcp", "udp"]


class RtspSettings(Schema):
    url: Annotated[str, Field(pattern=r"^rtsps?://")] | None
    transport: RtspTransport
    retry_s: Annotated[float, Field(gt=0.0)]


class StreamSettings(Schema):
    codec: str
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"]
    tune: Literal["zerolatency", "film", "animation", "grain", "stillimage", "fastdecode"] | None
    crf: Annotated[int, Field(ge=0, le=51)]
    gop: PositiveInt
    overlay: bool
    side_by_side: bool
    rtsp: RtspSettings


GROUPS: dict[str, type[Schema]] = {"pipeline": PipelineSettings, "stream": StreamSettings}


def problems(group: str, values: Mapping, schema: type[Schema]) -> list[str]:
    """One line per wrong value of config group `group` (a plain mapping) against `schema`:
    `group.key=value: what is allowed`; empty when all is well."""
    try:
        schema.model_validate(dict(values))
    except ValidationError as err:
        said: dict[str, list[str]] = {}  # by key: a union's members each say what they allow
        for error in err.errors(include_url=False):
            key, _, message = _line(group, values, error).partition(": ")
            if message not in said.setdefault(key, []):
                said[key].append(message)
        return [f"{key}: {' or '.join(messages)}" for key, messages in said.items()]
    return []


def check_groups(cfg: Mapping, schemas: Mapping[str, type[Schema]]) -> str | None:
    """The problems of every group of a resolved, plain config named in `schemas`, as one
    line (None when there are none)."""
    found = [line for group, schema in schemas.items() if isinstance(cfg.get(group), Mapping)
             for line in problems(group, cfg[group], schema)]
    return "; ".join(found) if found else None


# pydantic's messages, in the words of a config file.
WORDING = (("Input should be", "must be"), ("a valid boolean", "true or false"), ("a valid integer", "a whole number"),
           ("String should match pattern", "must match"), ("List should have", "must have"),
           (" after validation", ""), ("Input should be None", "null"))


def _line(group: str, values: Mapping, error: dict) -> str:
    # The key is as much of the error's location as walks down the values: a tuple's item
    # index or a union member's tag is not a key of its own.
    node: object = values
    keys: list[str] = []
    for part in error["loc"]:
        if not (isinstance(node, Mapping) and part in node):
            break
        keys.append(str(part))
        node = node[part]
    key = ".".join([group, *keys])
    if error["type"] == "extra_forbidden":
        return f"{key}: no such config key"
    text = "null" if node is None else str(node).lower() if isinstance(node, bool) else str(node)
    shown = text if len(text) <= 64 else text[:64] + "..."
    message = error["msg"]
    for pydantic_words, ours in WORDING:
        message = message.replace(pydantic_words, ours)
    return f"{key}={shown}: {message}"
