"""The layout colour table (RGB, 0-255): the only place colours of the layout are defined.

The released model was trained on these colours (nuScenes semantics: drivable-area border
blue, lane green, pedestrian crossing red), so they are fixed, not configurable. Blue and red
each have two meanings, one in the box image and one in the map image, as in the reference.
"""

from __future__ import annotations

from dwm.world.base import MapKind

RGB = tuple[int, int, int]

# Box categories the layout draws; any other category is skipped, as in the reference.
BOX_COLOURS: dict[str, RGB] = {
    "pedestrian": (255, 0, 0),
    "bicycle": (128, 255, 0),
    "motorcycle": (0, 255, 128),
    "bus": (128, 0, 255),
    "car": (0, 0, 255),
    "van": (0, 0, 255),
    "truck": (255, 255, 0),
}

# Map kinds in the reference's drawing order: road edges (curbs), then lane lines, then
# crosswalks; later kinds paint over earlier ones, so lane green lies over curb blue.
MAP_COLOURS: dict[MapKind, RGB] = {
    MapKind.ROAD_EDGE: (0, 0, 255),
    MapKind.LANE_LINE: (0, 255, 0),
    MapKind.CROSSWALK: (255, 0, 0),
}
