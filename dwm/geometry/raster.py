"""Painting projected segments and polygons on images, with no loop over them.

`draw_lines` draws as the reference does, pixel for pixel: PIL's `ImageDraw.line(width=3)`,
one segment after another (Pillow's libImaging/Draw.c rule, vectorised).
"""

from __future__ import annotations

import numpy as np

from dwm.geometry.projection import clip_segments

PEN_WIDTH = 3  # px at the native image size: the reference's ImageDraw.line(width=3)


def clip_to_window(
    p0: np.ndarray, p1: np.ndarray, width: int, height: int, margin: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The segments (n, 2) px that can touch the image, with ends safe to draw.

    Segments whose bounding box misses the image grown by `margin` px (the pen's reach) are
    left out: they draw nothing. Near-plane clipping can put ends millions of pixels away,
    far past where integer pixel maths is safe, so the others have their ends
    moved along the segment into a window one image larger on each side (the direction is
    kept; a moved end is off-image). Returns (index (m,) into the input, p0', p1' (m, 2)).
    """
    x0, y0, x1, y1 = p0[:, 0], p0[:, 1], p1[:, 0], p1[:, 1]
    near_image = (
        (np.maximum(x0, x1) >= -margin)
        & (np.minimum(x0, x1) <= width + margin)
        & (np.maximum(y0, y1) >= -margin)
        & (np.minimum(y0, y1) <= height + margin)
    )
    index = np.flatnonzero(near_image)
    q0, q1, inside = clip_segments(p0[index], p1[index], (-width, -height), (2 * width, 2 * height), axes=(0, 1))
    return index[inside], q0[inside], q1[inside]


def visible_in_image(p0: np.ndarray, p1: np.ndarray, width: int, height: int):
    """The parts of pixel segments (..., 2) inside the image: (p0', p1', keep) as `clip_segments`."""
    return clip_segments(p0, p1, (0.0, 0.0), (float(width), float(height)), axes=(0, 1))


def _round_up(f: np.ndarray) -> np.ndarray:
    return (np.sign(f) * np.floor(np.abs(f) + np.float32(0.5))).astype(np.int64)


def _round_down(f: np.ndarray) -> np.ndarray:
    return (np.sign(f) * np.ceil(np.abs(f) - np.float32(0.5))).astype(np.int64)


def _pen_quads(q0: np.ndarray, q1: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's `ImagingDrawWideLine` outline of segments q0 -> q1 (n, 2) int px (not of zero
    length): x and y (n, 4) int of its four vertices, in its order (a parallelogram)."""
    x0, y0, x1, y1 = q0[:, 0], q0[:, 1], q1[:, 0], q1[:, 1]
    dx, dy = (x1 - x0).astype(np.float64), (y1 - y0).astype(np.float64)
    length = np.hypot(dx, dy)
    half = np.float64((width - 1) / 2.0)
    # Pillow: ratio_min, ratio_max = ROUND_DOWN(half), ROUND_UP(half) / length, and the offsets
    # dxmin = ROUND_DOWN(ratio_min * dy), dymin = ROUND_DOWN(ratio_min * dx), ..., all in double.
    small, big = _round_down(half) / length, _round_up(half) / length
    dx_min, dy_min = _round_down(small * dy), _round_down(small * dx)
    dx_max, dy_max = _round_down(big * dy), _round_down(big * dx)
    xs = np.stack([x0 - dx_min, x1 - dx_min, x1 + dx_max, x0 + dx_max], axis=1)
    ys = np.stack([y0 + dy_max, y1 + dy_max, y1 - dy_min, y0 - dy_min], axis=1)
    return xs, ys


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For items with counts (n,) >= 0: (item (m,), k (m,)), k = 0..counts[item]-1, m = sum."""
    item = np.repeat(np.arange(len(counts)), counts)
    k = np.arange(len(item)) - np.repeat(np.cumsum(counts) - counts, counts)
    return item, k


def _quad_spans(xs: np.ndarray, ys: np.ndarray, height: int) -> tuple[np.ndarray, ...]:
    """Pillow's scanline fill (`polygon_generic`) of pen quads with vertices xs, ys (n, 4) int px,
    on rows 0..height-1.

    Pillow meets edge k (vertex k -> k+1) on row y at x = (y - y_k) * slope_k + x_k in float32
    and fills from ROUND_UP of the leftmost crossing to ROUND_DOWN of the rightmost (a
    horizontal edge counts its two ends). The quads are parallelograms (y_k + y_k+2 is the
    same for both diagonals), so the top vertex t faces the bottom one t+2 and each row meets
    one edge of each side, t -> t+1 -> t+2 and t -> t+3 -> t+2 (on a vertex's row both edges
    of that side give the vertex's x, up to float32 rounding that rounds away).
    Returns (quad, y, x_first, x_last), each (m,) int, one per row of each quad; x not yet
    clipped, x_first > x_last draws nothing.
    """
    n = len(xs)
    # Per edge k = 0..6 of quad q (edge k runs vertex k -> k+1, vertex k+4 is vertex k) at
    # 7 q + k, so that edges t .. t+3 need no wrapping; float32 as Pillow keeps them.
    top = ys.argmin(axis=1)
    xs, ys = np.concatenate([xs, xs], axis=1), np.concatenate([ys, ys], axis=1)  # (n, 8)
    rise = ys[:, 1:] - ys[:, :-1]
    run = (xs[:, 1:] - xs[:, :-1]).astype(np.float32)
    slope = (run / np.where(rise == 0, 1, rise).astype(np.float32)).ravel()  # 0 if horizontal
    x_start, y_start = xs[:, :-1].astype(np.float32).ravel(), ys[:, :-1].astype(np.float32).ravel()
    vertex = 8 * np.arange(n) + top
    y_top, y_down, y_bottom, y_up = (ys.ravel().take(vertex + i) for i in range(4))  # vertices t .. t+3
    first = np.maximum(y_top, 0)
    quad, k = _expand(np.maximum(np.minimum(y_bottom, height - 1) - first + 1, 0))
    y = first.take(quad) + k
    row = y.astype(np.float32)
    # Each side's edge on the row; a horizontal edge is met at its start, the row of vertex t+1
    # (down) or t+3 (up), where it gives that vertex. (`take` is numpy's fastest gather.)
    edge = (7 * np.arange(n) + top).take(quad)
    down = edge + (y >= y_down.take(quad))  # side t -> t+1 -> t+2: edge t, then t+1
    up = edge + 3 - (y > y_up.take(quad))  # side t -> t+3 -> t+2: edge t+3, then t+2
    x_down = (row - y_start.take(down)) * slope.take(down) + x_start.take(down)  # float32, as Pillow
    x_up = (row - y_start.take(up)) * slope.take(up) + x_start.take(up)
    return quad, y, _round_up(np.minimum(x_down, x_up)), _round_down(np.maximum(x_down, x_up))


def _thin_points(q0: np.ndarray, q1: np.ndarray) -> tuple[np.ndarray, ...]:
    """Pillow's width-1 line (Bresenham, `line32`, plus the end point ImageDraw adds): the
    pixels of segments q0 -> q1 (n, 2) int px as (segment, y, x, x), each (m,)."""
    d = q1 - q0
    major = np.abs(d).max(axis=1)
    segment, i = _expand(major + 1)
    d, major, q0 = d[segment], major[segment], q0[segment]
    # Along the major axis one pixel a step; the minor axis moves by round-half-up(i * minor / major).
    step = (2 * np.abs(d) * i[:, None] + major[:, None]) // (2 * np.maximum(major, 1))[:, None]
    xy = q0 + np.sign(d) * np.where(np.abs(d) == major[:, None], i[:, None], step)
    return segment, xy[:, 1], xy[:, 0], xy[:, 0]


def draw_lines(
    canvases: np.ndarray,
    views: np.ndarray,
    ranks: np.ndarray,
    p0: np.ndarray,
    p1: np.ndarray,
    colours: np.ndarray,
    width: int = PEN_WIDTH,
) -> None:
    """Draw segments p0 -> p1 (n, 2) float px on canvases (V, H, W, 3) uint8 in place, each as PIL's
    ImageDraw.line(width) draws it (ends truncated to int as PIL does); segment i goes on view views[i]
    in colours[ranks[i]] (colours (K, 3) uint8 RGB). Where segments overlap, the higher rank is on
    top, as if PIL painted them one by one in increasing rank (equal ranks share a colour, so their
    order does not matter).

    views (n,) int in [0, V); ranks (n,) int in [0, K); width px >= 1. The ends may lie anywhere
    in `clip_to_window`'s window (up to one image size beyond each side): the part of a line
    inside the image is drawn.

    How, with no loop over segments: each segment's pen quad (Pillow's four integer vertices),
    then one span per (segment, image row) from Pillow's float32 edge crossings and rounding,
    clipped to the image, then the spans' pixels, each taking the highest rank that covers it.
    Width 1 is Pillow's Bresenham line instead, end point included.
    """
    if len(p0) == 0:
        return
    views, ranks = np.asarray(views), np.asarray(ranks)
    if ranks.min() < 0 or ranks.max() >= len(colours):
        raise ValueError(f"ranks must index the {len(colours)} colours, got {ranks.min()}..{ranks.max()}")
    q0, q1 = np.asarray(p0).astype(np.int64), np.asarray(p1).astype(np.int64)  # truncation, as PIL
    if width <= 1:
        segment, y, x_first, x_last = _thin_points(q0, q1)
    else:
        wide = np.flatnonzero((q0 != q1).any(axis=1))
        dot = np.flatnonzero((q0 == q1).all(axis=1))  # zero length: Pillow draws its one point
        quad, y, x_first, x_last = _quad_spans(*_pen_quads(q0[wide], q1[wide], width), canvases.shape[1])
        segment = np.concatenate([wide[quad], dot])
        y = np.concatenate([y, q0[dot, 1]])
        x_first = np.concatenate([x_first, q0[dot, 0]])
        x_last = np.concatenate([x_last, q0[dot, 0]])
    _paint(canvases, views.take(segment), ranks.take(segment), y, x_first, x_last, colours)


def _paint(canvases, views, ranks, y, x_first, x_last, colours) -> None:
    """Paint spans (row y, columns x_first..x_last, each (m,) int) on canvases (V, H, W, 3) in
    colours[rank], the highest rank on top; spans are clipped to the image here.

    Per-pixel arrays are updated in place: fresh big temporaries cost page faults.
    """
    if not canvases.flags.c_contiguous:
        raise ValueError("canvases must be C-contiguous (they are painted through a flat view)")
    n_views, height, width = canvases.shape[:3]
    x_first = np.maximum(x_first, 0)
    counts = np.where((y >= 0) & (y < height), np.maximum(np.minimum(x_last, width - 1) - x_first + 1, 0), 0)
    # Pixels of the spans, (p,) flat indices into (V, H, W): span start + 0, 1, ..., count - 1.
    start = (views * height + y) * width + x_first - (np.cumsum(counts) - counts)
    pixel = np.repeat(start, counts)  # intp: numpy's scatters take it without a cast
    pixel += np.arange(len(pixel))
    # The highest rank + 1 per pixel (0: untouched), in the smallest type that holds it: a
    # fresh zeroed buffer costs only the pages it touches.
    label = np.uint8 if len(colours) < 255 else np.uint16 if len(colours) < 65535 else np.uint32
    top = np.zeros(n_views * height * width, dtype=label)
    np.maximum.at(top, pixel, np.repeat((ranks + 1).astype(label), counts))
    winner = top.take(pixel)  # for every (pixel, span) pair: duplicates agree
    palette = np.zeros((3, len(colours) + 1), dtype=np.uint8)  # channel, rank + 1
    palette[:, 1:] = np.asarray(colours, dtype=np.uint8).T
    flat = canvases.reshape(-1)
    pixel *= 3
    for channel in range(3):
        flat[channel:][pixel] = palette[channel].take(winner)


def polygon_spans(polygons: np.ndarray, height: int) -> tuple[np.ndarray, ...]:
    """The pixel spans of convex polygons (n, k, 2) float px on rows 0..height-1.

    A pixel (x, y) (its centre at integer x, y) is inside when its centre is inside the
    polygon. Vertices may repeat (a polygon of fewer than k corners repeats its last one);
    the order may turn either way. Returns (polygon, y, x_first, x_last), each (m,) int, one
    per row a polygon crosses; x not clipped, x_first > x_last paints nothing.
    """
    n, k = polygons.shape[:2]
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    ys = polygons[..., 1]
    first = np.maximum(np.ceil(ys.min(axis=1)), 0).astype(np.int64)
    last = np.minimum(np.floor(ys.max(axis=1)), height - 1).astype(np.int64)
    polygon, row = _expand(np.maximum(last - first + 1, 0))
    y = (first.take(polygon) + row).astype(np.float64)
    # Every edge a -> b of the polygon met on the row (m, k): a convex polygon's row crosses
    # its outline at two points (or touches a vertex); the span lies between the outermost.
    a, b = polygons[polygon], np.roll(polygons, -1, axis=1)[polygon]
    ya, yb = a[..., 1], b[..., 1]
    meets = (np.minimum(ya, yb) <= y[:, None]) & (y[:, None] <= np.maximum(ya, yb))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(yb != ya, (y[:, None] - ya) / (yb - ya), 0.0)
    x = a[..., 0] + t * (b[..., 0] - a[..., 0])
    left = np.where(meets, x, np.inf).min(axis=1)
    right = np.where(meets, x, -np.inf).max(axis=1)
    ok = np.isfinite(left) & np.isfinite(right)
    # Ends far off the image (a vertex just past the near plane) are clamped before the int cast.
    x_first = np.ceil(np.clip(left, -1.0, 2.0**40)).astype(np.int64)
    x_last = np.floor(np.clip(right, -2.0, 2.0**40)).astype(np.int64)
    x_last = np.where(ok, x_last, x_first - 1)
    return polygon, y.astype(np.int64), x_first, x_last


def fill_polygons(
    canvases: np.ndarray, views: np.ndarray, ranks: np.ndarray, polygons: np.ndarray, colours: np.ndarray
) -> None:
    """Fill convex polygons (n, k, 2) float px on canvases (V, H, W, 3) uint8 in place:
    polygon i on view views[i] in colours[ranks[i]] (colours (K, 3) uint8 RGB, ranks (n,) int
    in [0, K)); where polygons overlap the higher rank is on top, as if painted one by one in
    increasing rank. Every polygon's pixels are painted (the union, not OpenCV's even-odd
    rule of one `fillPoly` call over several contours), with no loop over polygons."""
    if len(polygons) == 0:
        return
    views, ranks = np.asarray(views), np.asarray(ranks)
    if ranks.min() < 0 or ranks.max() >= len(colours):
        raise ValueError(f"ranks must index the {len(colours)} colours, got {ranks.min()}..{ranks.max()}")
    polygon, y, x_first, x_last = polygon_spans(np.asarray(polygons, dtype=np.float64), canvases.shape[1])
    _paint(canvases, views.take(polygon), ranks.take(polygon), y, x_first, x_last, colours)
