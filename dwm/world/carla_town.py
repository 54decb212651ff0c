"""What the Carla world takes from the town it runs in, and the weather it sets there: the
town's map geometry (extracted once per town and process), its caption description, its spawn
points, and the `world.weather` config as Carla weather."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from dwm.world.carla_map import extract_map
from dwm.world.map_geometry import MapGeometry

TOWN_DESCRIPTIONS = {  # caption scene descriptions; the reference's for Town10
    "Town10HD": "A downtown urban environment with skyscrapers, residential buildings and an ocean promenade.",
}
DEFAULT_DESCRIPTION = "A town with streets, buildings, sidewalks and trees."
_MAPS: dict[str, MapGeometry] = {}  # town name + OpenDRIVE digest -> its geometry, once per process


def town_geometry(town, step: float) -> MapGeometry:
    """Map segments of a `carla.Map`, sampled every `step` m along the lanes; a town seen
    before (same name and OpenDRIVE) is not extracted again."""
    xodr = town.to_opendrive()
    key = f"{town.name}:{hashlib.sha1(xodr.encode()).hexdigest()}"
    if key not in _MAPS:
        _MAPS[key] = extract_map(town, step)
    return _MAPS[key]


def town_from_file(carla, path: str | Path, key: str = "world.map"):
    """A `carla.Map` built offline from an OpenDRIVE file (no server: Carla's client builds it).
    ValueError naming the config `key`, the file and why: missing, not XML, or refused by Carla."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{key}={str(path)!r}: no such file (give the path of an OpenDRIVE .xodr file)")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise ValueError(f"{key}={str(path)!r} is not an OpenDRIVE file: the XML cannot be read ({err})") from None
    if root.tag != "OpenDRIVE" or root.find("road") is None:
        raise ValueError(f"{key}={str(path)!r} is not an OpenDRIVE file with roads (its root is <{_short_tag(root.tag)}>, "
                         f"with {len(root.findall('road'))} <road>)")
    try:
        return carla.Map(path.stem, text)
    except Exception as err:  # RuntimeError, or IndexError from its C++ (e.g. a direct junction)
        raise ValueError(f"{key}={str(path)!r}: Carla cannot build a map from this OpenDRIVE file "
                         f"({type(err).__name__}: {err})") from None


def _short_tag(tag: str) -> str:
    return tag if len(tag) <= 40 else tag[:40] + "..."


def town_description(town) -> str:
    """The caption scene description of a `carla.Map` (the `_Opt` variant is the same town)."""
    short = town.name.rsplit("/", 1)[-1].removesuffix("_Opt")
    return TOWN_DESCRIPTIONS.get(short, DEFAULT_DESCRIPTION)


def spawn_points(carla, town, spacing: float = 25.0) -> list:
    """The town's recommended spawn points (carla.Transforms). Maps without them (bare
    OpenDRIVE): driving-lane points every `spacing` m, raised 0.5 m so that vehicles drop onto
    the road."""
    points = list(town.get_spawn_points())
    if points:
        return points
    for wp in town.generate_waypoints(spacing):
        t = wp.transform
        points.append(carla.Transform(t.location + carla.Location(z=0.5), t.rotation))
    return points


def carla_weather(carla, world, weather):
    """`world.weather` as carla.WeatherParameters: null keeps the server's (None); a preset name
    (ClearNoon, WetCloudySunset, ...) or a mapping of carla.WeatherParameters fields, applied
    over the world's current weather. ValueError naming what is allowed otherwise."""
    if weather is None:
        return None
    presets = sorted(n for n in dir(carla.WeatherParameters) if n[0].isupper())
    if isinstance(weather, str):
        if weather not in presets:
            raise ValueError(f"world.weather={weather!r} is not a Carla weather preset; allowed: {', '.join(presets)}")
        return getattr(carla.WeatherParameters, weather)
    if not isinstance(weather, Mapping):
        raise ValueError(f"world.weather={weather!r} must be null, a preset name or a mapping of weather values")
    params = world.get_weather()
    fields = sorted(n for n in dir(params) if not n.startswith("_") and isinstance(getattr(params, n), float))
    for key, value in weather.items():
        if key not in fields:
            raise ValueError(f"world.weather.{key}: no such Carla weather value; allowed: {', '.join(fields)}")
        setattr(params, key, float(value))
    return params
