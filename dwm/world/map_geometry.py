"""The map segments of one map (lane lines, road edges, crosswalks) and the query for those
around a point, shared by both worlds.

numpy only: the Carla world uses it without importing highway-env.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from dwm.world.base import MapLines

CULL_CELL_M = 50.0  # grid cell side for culling large maps
CULL_GRID_MIN_SEGMENTS = 4096  # smaller maps are culled by testing every segment


@dataclass(frozen=True)
class MapGeometry:
    """All map segments of one map, world frame, computed once.

    starts (S, 3), ends (S, 3) m (z = 0 on the embedded maps); kinds (S,) `MapKind` codes.
    Culling a large map (a Carla town: tens of thousands of segments) looks only at the grid
    cells of `CULL_CELL_M` around the point; the result is that of testing every segment.
    """

    starts: np.ndarray
    ends: np.ndarray
    kinds: np.ndarray

    def near(self, xy: np.ndarray, radius: float) -> MapLines:
        """Segments with an endpoint within `radius` m of the world point `xy` (2,), in map order."""
        rows = self._candidates(np.asarray(xy, dtype=np.float64), radius)
        starts, ends = self.starts[rows, :2], self.ends[rows, :2]
        r2 = radius * radius
        near = (np.sum((starts - xy) ** 2, axis=1) <= r2) | (np.sum((ends - xy) ** 2, axis=1) <= r2)
        rows = rows[near]
        return MapLines(self.starts[rows], self.ends[rows], self.kinds[rows])

    def _candidates(self, xy: np.ndarray, radius: float) -> np.ndarray:
        """Sorted rows of the segments with an endpoint in a grid cell that the square of
        half side `radius` around `xy` touches (every row for small maps)."""
        if len(self.kinds) < CULL_GRID_MIN_SEGMENTS:
            return np.arange(len(self.kinds))
        lo = np.floor((xy - radius) / CULL_CELL_M).astype(np.int64)
        hi = np.floor((xy + radius) / CULL_CELL_M).astype(np.int64)
        cells = self._cells
        parts = [cells[(i, j)] for i in range(lo[0], hi[0] + 1) for j in range(lo[1], hi[1] + 1) if (i, j) in cells]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    @functools.cached_property
    def _cells(self) -> dict[tuple[int, int], np.ndarray]:
        """Grid cell (i, j) -> rows (n,) of the segments with an endpoint in it."""
        count = len(self.kinds)
        ends = np.concatenate([self.starts[:, :2], self.ends[:, :2]])  # (2S, 2)
        keys = np.floor(ends / CULL_CELL_M).astype(np.int64)
        rows = np.concatenate([np.arange(count), np.arange(count)])
        order = np.lexsort((rows, keys[:, 1], keys[:, 0]))
        keys, rows = keys[order], rows[order]
        breaks = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
        return {
            (int(k[0]), int(k[1])): np.unique(r)
            for k, r in zip(keys[np.concatenate([[0], breaks])], np.split(rows, breaks))
        }
