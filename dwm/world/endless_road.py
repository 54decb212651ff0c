"""The endless highway: how far to move the whole scene back along the road so that the egos
never reach its end.

The highway is a straight road along x (10 km). Moving every vehicle back by the same
distance changes nothing relative to anything else; only the egos' world poses jump, by a
multiple of `TREADMILL_STEP_M`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

TREADMILL_STEP_M = 100.0  # the endless road moves back by multiples of this


def scene_shift(ego_xs: Sequence[float], road_length: float, clearance_m: float) -> float:
    """Distance (m, >= 0) to move every vehicle back along x at this tick.

    ego_xs: the egos' positions along the road (m); road_length: m; clearance_m: road kept in
    front of the front ego and behind the rear one (where traffic lives around them). Zero
    until the front ego comes within `clearance_m + TREADMILL_STEP_M` of the end; zero too
    when the egos spread over the whole road (the front one then leaves it and is put back).
    """
    if not ego_xs:
        return 0.0
    margin = clearance_m + TREADMILL_STEP_M
    if max(ego_xs) < road_length - margin:
        return 0.0
    shift = math.floor((min(ego_xs) - margin) / TREADMILL_STEP_M) * TREADMILL_STEP_M
    return shift if shift > 0 else 0.0
