"""Vectorised projection of 3D segments into pinhole cameras (pure numpy, no per-segment loop)."""

from __future__ import annotations

import numpy as np

# Corner i of a box has offset sign +1 along x, y, z where bit 2, 1, 0 of i is set
# (i = 4*xbit + 2*ybit + zbit), the reference's template order. With +y to the left, corner 6
# is (+x, +y, -z): front-left-bottom.
CORNER_SIGNS = np.array([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], dtype=np.float64) * 2.0 - 1.0

# The 12 edges of a box (corners differing in one bit) plus the diagonals (6, 3) across the
# left face and (6, 5) across the front face, which mark the heading. (14, 2) corner indices.
BOX_EDGES = np.array(
    [(i, i | bit) for bit in (1, 2, 4) for i in range(8) if not i & bit] + [(6, 3), (6, 5)], dtype=np.intp
)


def box_corners(centers: np.ndarray, sizes: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """(N, 8, 3) world corners of oriented boxes: centres (N, 3) m, full sizes (N, 3) m
    (length, width, height along the box's x, y, z), rotations (N, 3, 3) world <- box."""
    local = CORNER_SIGNS[None] * (0.5 * sizes)[:, None, :]  # (N, 8, 3), box frame
    return local @ rotations.transpose(0, 2, 1) + centers[:, None, :]


def transform_points(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply affine maps (V, 3 or 4, 4) to points (..., 3): returns (V, ..., 3)."""
    flat = points.reshape(-1, 3)
    # matmul, not einsum: numpy's einsum is about 20x slower for these small matrices.
    out = flat @ transform[:, :3, :3].transpose(0, 2, 1) + transform[:, None, :3, 3]  # (V, n, 3)
    return out.reshape((transform.shape[0],) + points.shape)


def clip_segments(
    a: np.ndarray, b: np.ndarray, lower, upper, axes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip segments a->b (..., D) to lower[k] <= p[axes[k]] <= upper[k] (Liang-Barsky).

    The clipped ends move along the segment by linear interpolation, so the direction is
    kept. Returns (a', b', keep): keep (...) is False for segments wholly outside, whose
    a', b' are their unclipped ends.
    """
    shape = a.shape
    a, b = a.reshape(-1, shape[-1]), b.reshape(-1, shape[-1])
    d = b - a
    t0 = np.zeros(len(a))
    t1 = np.ones(len(a))
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis, lo, hi in zip(axes, lower, upper):
            v0, dv = a[..., axis], d[..., axis]
            # Parameters where the line crosses the two planes. A segment parallel to them
            # (dv == 0) gets -inf/+inf when inside and a same-signed pair when outside; one
            # lying on a plane (0/0) counts as inside.
            t_lo = (lo - v0) / dv
            t_hi = (hi - v0) / dv
            np.copyto(t_lo, -np.inf, where=np.isnan(t_lo))
            np.copyto(t_hi, np.inf, where=np.isnan(t_hi))
            np.maximum(t0, np.minimum(t_lo, t_hi), out=t0)
            np.minimum(t1, np.maximum(t_lo, t_hi), out=t1)
    keep = t0 <= t1
    t0, t1 = np.where(keep, t0, 0.0), np.where(keep, t1, 1.0)
    a_out, b_out = a + t0[:, None] * d, a + t1[:, None] * d
    return a_out.reshape(shape), b_out.reshape(shape), keep.reshape(shape[:-1])


def project_segments(
    camera_from_world: np.ndarray,
    intrinsics: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    near: float,
    far: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Project world segments starts -> ends (S, 3) m into V cameras, clipped to
    near <= depth <= far (m).

    camera_from_world (V, 4, 4) to OpenCV cameras; pinhole intrinsics (V, 3, 3) whose last
    row is [0, 0, 1]. Returns the (view, segment) pairs with a part between the planes:
    views (n,), segment indices (n,) and the pixel ends of that part, p0 and p1 (n, 2),
    which may lie far outside the image.
    """
    # Homogeneous pixels (u z, v z, z) <- world, (V, 3, 4): one product per point, and
    # clipping on the third coordinate is clipping on depth (the map is linear).
    pixels_from_world = intrinsics @ camera_from_world[:, :3, :]
    a = transform_points(pixels_from_world, starts)  # (V, S, 3)
    b = transform_points(pixels_from_world, ends)
    a, b, keep = clip_segments(a, b, (near,), (far,), axes=(2,))
    views, index = np.nonzero(keep)
    a, b = a[keep], b[keep]  # (n, 3), depth >= near > 0
    return views, index, a[:, :2] / a[:, 2:], b[:, :2] / b[:, 2:]


# The 6 faces of a box as corner indices (see CORNER_SIGNS), each in a cycle around the face,
# and their outward normals in the box frame: front, back, left, right, top, bottom.
BOX_FACES = np.array([[4, 5, 7, 6], [0, 2, 3, 1], [2, 6, 7, 3], [0, 1, 5, 4], [1, 3, 7, 5], [0, 4, 6, 2]], dtype=np.intp)
BOX_FACE_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64)


def clip_polygons_near(points: np.ndarray, near: float) -> tuple[np.ndarray, np.ndarray]:
    """Clip convex polygons (n, k, 3) in camera coordinates (depth z, m) to z >= near.

    One plane cuts a convex k-gon into a convex polygon of at most k + 1 corners. Returns
    (polygons (n, k + 1, 3), keep (n,)): each polygon's corners in order, the last repeated
    to fill k + 1; keep is False for polygons wholly in front of the plane.
    """
    n, k = points.shape[:2]
    a, b = points, np.roll(points, -1, axis=1)
    a_in, b_in = a[..., 2] >= near, b[..., 2] >= near
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (near - a[..., 2]) / (b[..., 2] - a[..., 2])
    crossing = a + np.where(a_in != b_in, t, 0.0)[..., None] * (b - a)
    # Per edge a -> b (Sutherland-Hodgman): a when inside, then the crossing when the edge
    # goes through the plane. (n, 2k) candidates, kept in order.
    candidates = np.stack([a, crossing], axis=2).reshape(n, 2 * k, 3)
    take = np.stack([a_in, a_in != b_in], axis=2).reshape(n, 2 * k)
    count = take.sum(axis=1)
    order = np.argsort(~take, axis=1, kind="stable")[:, : k + 1]  # the taken ones first, in order
    slot = np.minimum(np.arange(k + 1)[None], np.maximum(count - 1, 0)[:, None])  # repeat the last
    polygons = np.take_along_axis(candidates, np.take_along_axis(order, slot, axis=1)[..., None], axis=1)
    return polygons, count >= 3
