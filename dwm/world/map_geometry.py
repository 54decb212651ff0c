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
        xy = np.asarray(xy, dtype=np.float64)
        if len(self.kinds) < CULL_GRID_MIN_SEGMENTS:
            rows = self._within(np.arange(len(self.kinds)), xy, radius)
        else:
            rows = self._near_by_cells(xy, radius)
        return MapLines(self.starts[rows], self.ends[rows], self.kinds[rows])

    def _within(self, rows: np.ndarray, xy: np.ndarray, radius: float) -> np.ndarray:
        """The `rows` whose segment has an endpoint within `radius` m of `xy`."""
        a = self.starts[rows, :2] - xy
        b = self.ends[rows, :2] - xy
        r2 = radius * radius
        near = (a[:, 0] * a[:, 0] + a[:, 1] * a[:, 1] <= r2) | (b[:, 0] * b[:, 0] + b[:, 1] * b[:, 1] <= r2)
        return rows[near]

    def _near_by_cells(self, xy: np.ndarray, radius: float) -> np.ndarray:
        """`near`'s rows from the grid: the segments of cells wholly within the circle are in,
        those of cells it crosses are tested; the same rows as testing every segment."""
        lo = np.floor((xy - radius) / CULL_CELL_M).astype(np.int64)
        hi = np.floor((xy + radius) / CULL_CELL_M).astype(np.int64)
        cells = self._cells
        take = np.zeros(len(self.kinds), dtype=bool)
        maybe = []
        r2 = radius * radius
        for i in range(int(lo[0]), int(hi[0]) + 1):
            dx = max(abs(i * CULL_CELL_M - xy[0]), abs((i + 1) * CULL_CELL_M - xy[0]))
            for j in range(int(lo[1]), int(hi[1]) + 1):
                rows = cells.get((i, j))
                if rows is None:
                    continue
                dy = max(abs(j * CULL_CELL_M - xy[1]), abs((j + 1) * CULL_CELL_M - xy[1]))
                if dx * dx + dy * dy <= r2:
                    take[rows] = True  # the whole cell is within the circle
                else:
                    maybe.append(rows)
        if maybe:
            take[self._within(np.concatenate(maybe), xy, radius)] = True
        return np.flatnonzero(take)

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
