"""A highway-env road network whose roads are single lanes, linked lane to lane: the shape of an
OpenDRIVE map once its lanes are known (`dwm.world.opendrive_map` builds one from Carla's map).

highway-env groups parallel lanes into one road between two nodes and links roads at nodes; a
town links lanes: at a junction each incoming lane has its own turns. Here every lane is a road
of its own, `(from, to, 0)`, whose end node is the start node of each lane it leads to, so that
highway-env's route following, car following across lane ends and the junction controller of
`dwm.world.traffic_road` work unchanged. Lanes beside each other (where a car may change lanes)
are listed explicitly (`side_lanes`), with where along the lane the marking allows a change.

Everything here is in highway-env's screen frame (y down), which is Carla's frame too (x
forward, y to the right, seen from above).
"""

from __future__ import annotations

import bisect
import math

import numpy as np
from highway_env.road.lane import AbstractLane, LineType
from highway_env.road.road import LaneIndex, RoadNetwork


class PolylineLane(AbstractLane):
    """A lane along a polyline: its centre line `points` (n, 2) m, with the lane's heading
    `headings` (n,) rad and width `widths` (n,) m at each point; straight between points.

    Lane coordinates: s (m) along the line from its first point, lateral (m) to the right of
    the heading (highway-env's convention); beyond either end the end segment is extended."""

    def __init__(self, points: np.ndarray, headings: np.ndarray, widths: np.ndarray,
                 speed_limit: float = 20.0, priority: int = 0):
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if len(points) < 2:
            raise ValueError("a lane needs at least 2 points")
        self.points = points
        d = np.diff(points, axis=0)  # (n-1, 2)
        self._seg_len = np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-9)
        self._dir = d / self._seg_len[:, None]  # (n-1, 2) unit
        self._s = np.concatenate([[0.0], np.cumsum(self._seg_len)])  # (n,) s at each point
        self.length = float(self._s[-1])
        self._headings = np.unwrap(np.asarray(headings, dtype=np.float64))
        self._widths = np.asarray(widths, dtype=np.float64)
        self._segs = [(*p, *u, n, s0) for p, u, n, s0 in
                      zip(points[:-1].tolist(), self._dir.tolist(), self._seg_len.tolist(), self._s[:-1].tolist())]
        self._s_list = self._s.tolist()
        # Where the lane gets too narrow for a car for good (a lane that narrows away): a car
        # waiting to leave it stops before.
        self.usable_length = self.length
        wide = np.flatnonzero(self._widths >= self.NARROW_M)
        if self._widths[-1] < self.NARROW_M:
            k = int(wide[-1]) if len(wide) else -1
            if k < 0:
                self.usable_length = 0.0
            else:  # where the width falls through NARROW_M on the segment after the last wide point
                w0, w1 = self._widths[k], self._widths[k + 1]
                self.usable_length = float(self._s[k] + (self._s[k + 1] - self._s[k]) * (w0 - self.NARROW_M) / (w0 - w1))
        # Curvature (1/m) of each segment from the headings at its ends.
        curvature = np.abs(np.diff(self._headings)) / self._seg_len
        self._curves = [(float(self._s[k]), float(self._s[k + 1]), float(curvature[k]))
                        for k in np.flatnonzero(curvature > self.CURVED)]
        grow = self.VEHICLE_LENGTH + float(np.max(self._widths)) / 2 + 1.0
        self._box = (*(points.min(axis=0) - grow).tolist(), *(points.max(axis=0) + grow).tolist())
        self._heading_list = self._headings.tolist()
        self._width_list = self._widths.tolist()
        self.line_types = [LineType.NONE, LineType.NONE]  # the painted lines come from the map itself
        self.forbidden = False
        self.speed_limit = speed_limit
        self.priority = priority

    NARROW_M = 2.5  # m: narrower than this a lane holds no car
    CURVED = 1e-3  # 1/m: segments bending more than this are curves (radius under 1 km)

    def curves_ahead(self, s: float, reach: float) -> list[tuple[float, float]]:
        """[(distance (m) from s to the curve's start, 0 when at it; its curvature (1/m))] of
        the curved segments ahead of s within `reach` m."""
        return [(max(s0 - s, 0.0), kappa) for s0, s1, kappa in self._curves if s1 > s and s0 < s + reach]

    def may_hold(self, position: np.ndarray) -> bool:
        """False when `position` is surely not `on_lane` with a margin of up to 1 m (outside the
        lane's box grown by a vehicle length and a width)."""
        x0, y0, x1, y1 = self._box
        return x0 <= position[0] <= x1 and y0 <= position[1] <= y1

    # Plain Python over the segments: lanes have a few to a few tens of points, where numpy's
    # per-call cost is most of the work (these run hundreds of times per tick).

    def _segment(self, s: float) -> int:
        return min(max(bisect.bisect_right(self._s_list, s) - 1, 0), len(self._segs) - 1)

    def position(self, longitudinal: float, lateral: float) -> np.ndarray:
        ax, ay, dx, dy, _, s0 = self._segs[self._segment(longitudinal)]
        along = longitudinal - s0
        return np.array([ax + along * dx - lateral * dy, ay + along * dy + lateral * dx])

    def local_coordinates(self, position: np.ndarray) -> tuple[float, float]:
        px, py = float(position[0]), float(position[1])
        best = math.inf
        found = (0.0, 0.0, 0.0, 0)
        for k, (ax, ay, dx, dy, length, _) in enumerate(self._segs):
            rx, ry = px - ax, py - ay
            along = rx * dx + ry * dy
            across = ry * dx - rx * dy
            off = along if along < 0.0 else (along - length if along > length else 0.0)
            error = off * off + across * across
            if error < best:
                best, found = error, (along, across, off, k)
        along, across, off, k = found
        _, _, _, _, length, s0 = self._segs[k]
        if not ((k == 0 and along < 0.0) or (k == len(self._segs) - 1 and along > length)):
            along -= off  # clipped to the segment
        return s0 + along, across

    def _interp(self, values: list[float], s: float) -> float:
        k = self._segment(s)
        s0, s1 = self._s_list[k], self._s_list[k + 1]
        t = min(max((s - s0) / (s1 - s0), 0.0), 1.0)
        return values[k] + t * (values[k + 1] - values[k])

    def heading_at(self, longitudinal: float) -> float:
        return self._interp(self._heading_list, longitudinal)

    def width_at(self, longitudinal: float) -> float:
        return self._interp(self._width_list, longitudinal)

    def to_config(self) -> dict:
        return {"class_name": "PolylineLane", "config": {"points": self.points.tolist(),
                                                           "headings": self._headings.tolist(),
                                                           "widths": self._widths.tolist()}}


class LaneNetwork(RoadNetwork):
    """highway-env's road network with one lane per road, lane changes between the lanes
    listed in `sides` and a spatial index for the closest lane.

    sides: lane index -> {lane index beside it: (s (k,) m along the lane, allowed (k,) bool)},
    where a change into that lane is allowed from s[i] on until s[i+1]."""

    CELL_M = 25.0  # grid cell of the closest-lane index

    def __init__(self):
        super().__init__()
        self.sides: dict[LaneIndex, dict[LaneIndex, tuple[np.ndarray, np.ndarray]]] = {}
        self._cells: dict[tuple[int, int], list[LaneIndex]] | None = None
        self._all: list[LaneIndex] = []

    def side_lanes(self, lane_index: LaneIndex) -> list[LaneIndex]:
        return list(self.sides.get(lane_index, {}))

    def all_side_lanes(self, lane_index: LaneIndex) -> list[LaneIndex]:
        return [lane_index, *self.side_lanes(lane_index)]

    def lane_change_allowed(self, lane_index: LaneIndex, target: LaneIndex, position: np.ndarray) -> bool:
        """The marking between `lane_index` and the lane beside it `target` allows a change at
        `position` (m)."""
        if lane_index == target:
            return True
        side = self.sides.get(lane_index, {}).get(target)
        if side is None:
            return False
        s_at, allowed = side
        s = self.get_lane(lane_index).local_coordinates(position)[0]
        return bool(allowed[max(int(np.searchsorted(s_at, s, side="right")) - 1, 0)])

    def index_lanes(self) -> None:
        """Build the closest-lane index; call once every lane is added."""
        self._all = [(a, b, i) for a, tos in self.graph.items() for b, lanes in tos.items() for i in range(len(lanes))]
        cells: dict[tuple[int, int], list[LaneIndex]] = {}
        slack = 2 * AbstractLane.DEFAULT_WIDTH + AbstractLane.VEHICLE_LENGTH
        for index in self._all:
            pts = self.get_lane(index).points
            lo = np.floor((pts.min(axis=0) - slack) / self.CELL_M).astype(int)
            hi = np.floor((pts.max(axis=0) + slack) / self.CELL_M).astype(int)
            for i in range(lo[0], hi[0] + 1):
                for j in range(lo[1], hi[1] + 1):
                    cells.setdefault((i, j), []).append(index)
        self._cells = cells

    def get_closest_lane_index(self, position: np.ndarray, heading: float | None = None) -> LaneIndex:
        """highway-env's closest lane (distance plus heading difference), among the lanes of
        the grid cell around `position` when one is there, else among all."""
        if self._cells is None:
            self.index_lanes()
        cell = (math.floor(position[0] / self.CELL_M), math.floor(position[1] / self.CELL_M))
        candidates = self._cells.get(cell) or self._all
        distances = [self.get_lane(k).distance_with_heading(position, heading) for k in candidates]
        return candidates[int(np.argmin(distances))]
