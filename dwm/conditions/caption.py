"""Per-view captions in the reference's form: "{time}. {weather}. {environment} {objects}."."""

from __future__ import annotations

from collections.abc import Iterable

from dwm.world.base import Weather

# Box category -> the word Carla's semantic labels use in captions.
CAPTION_LABELS = {
    "car": "car",
    "van": "car",
    "truck": "truck",
    "bus": "bus",
    "motorcycle": "motorcycle",
    "bicycle": "bicycle",
    "pedestrian": "pedestrian",
}

# Said first when map lines are visible: the reference's semantic label 1.
ROADS = "roads"


def time_of_day(weather: Weather) -> str:
    """The sun above 5 deg is day, above -5 deg sunset, lower night."""
    if weather.sun_altitude_angle > 5:
        return "daytime"
    if weather.sun_altitude_angle > -5:
        return "sunset"
    return "night"


def weather_words(weather: Weather) -> str:
    """Precipitation over 30 is rain, then fog over 50, clouds over 70 / 30, else clear."""
    if weather.precipitation > 30:
        return "rainy"
    if weather.fog_density > 50:
        return "foggy"
    if weather.cloudiness > 70:
        return "overcast"
    if weather.cloudiness > 30:
        return "cloudy"
    return "clear sky"


def object_words(categories: Iterable[str], roads: bool) -> list[str]:
    """Caption words for a view: "roads" if the road shows, then each label once, in the
    order given (first occurrence); categories without a label are left out."""
    words = [ROADS] if roads else []
    for category in categories:
        label = CAPTION_LABELS.get(category)
        if label is not None and label not in words:
            words.append(label)
    return words


def caption(weather: Weather, environment: str, objects: list[str]) -> str:
    """e.g. "daytime. clear sky. A multi-lane highway. roads, car, truck."."""
    head = f"{time_of_day(weather)}. {weather_words(weather)}. {environment.strip()}"
    if not objects:
        # The reference would leave " ." here; a caption without objects just ends.
        return head if head.endswith(".") else head + "."
    return f"{head} {', '.join(objects)}."
