"""The model's conditions: layout images, camera scalars and captions of a simulated moment.

Public API (no world needed): `CameraRig` (from K and poses, fovs and poses, or a rig
config), `Boxes` and `MapLines` (world or ego frame, metres), and `ConditionBuilder`, whose
`draw` returns a `Layout` (box and map images at any resolution, the 11 camera scalars per
view) and whose `build` turns a world's `Observation` into the `ConditionFrame` the model
takes.
"""

from dwm.conditions.builder import ConditionBuilder, Layout
from dwm.conditions.frame import ConditionFrame
from dwm.world.rig import CAMERA_PARAM_NAMES, CameraRig
from dwm.world.base import Boxes, MapKind, MapLines

__all__ = ["Boxes", "CAMERA_PARAM_NAMES", "CameraRig", "ConditionBuilder", "ConditionFrame", "Layout", "MapKind", "MapLines"]
