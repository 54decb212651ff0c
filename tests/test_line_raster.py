"""draw_lines against PIL's own `ImageDraw.line(width=3)`, the reference's drawing call.

Run with -s to see the per-colour IoU figures.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dwm.geometry.raster import PEN_WIDTH, draw_lines

# Box colours of the reference (RGB), one per rank in the random scenes.
COLOURS = np.array(
    [[255, 0, 0], [128, 255, 0], [0, 255, 128], [128, 0, 255], [0, 0, 255], [255, 255, 0]], dtype=np.uint8
)
SIZES = [(640, 360), (304, 176)]  # (W, H): the native size and the model's
SEEDS = range(4)
MIN_IOU = 0.97


def pil_lines(size, p0, p1, ranks, colours, width=PEN_WIDTH) -> np.ndarray:
    """The reference: one ImageDraw.line per segment, in increasing rank, on a black RGB image."""
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for i in np.argsort(ranks, kind="stable"):
        draw.line([(p0[i, 0], p0[i, 1]), (p1[i, 0], p1[i, 1])], fill=tuple(int(c) for c in colours[ranks[i]]), width=width)
    return np.asarray(image)


def our_lines(size, p0, p1, ranks, colours, width=PEN_WIDTH) -> np.ndarray:
    canvas = np.zeros((1, size[1], size[0], 3), dtype=np.uint8)
    draw_lines(canvas, np.zeros(len(p0), dtype=int), ranks, p0, p1, colours, width)
    return canvas[0]


def random_segments(rng: np.random.Generator, size, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """n segments of each kind, float px within `clip_to_window`'s window (one image size beyond
    each side): anywhere (often partly outside), near-horizontal, near-vertical, at 45 degrees,
    very short, of zero length (ends truncating to the same pixel), long across the image."""
    w, h = size
    scale = np.array([w, h], dtype=float)

    def anywhere(k):
        return rng.uniform(-1, 2, (k, 2)) * scale

    def inside(k):
        return rng.uniform(-0.1, 1.1, (k, 2)) * scale

    starts, ends = [], []
    p = anywhere(n)
    starts.append(p), ends.append(anywhere(n))
    for direction in ("horizontal", "vertical", "diagonal"):
        p = inside(n)
        run = rng.uniform(-300, 300, n)
        drift = rng.uniform(-3, 3, n)
        step = {"horizontal": (run, drift), "vertical": (drift, run), "diagonal": (run, run * rng.choice([-1, 1], n))}
        starts.append(p), ends.append(p + np.stack(step[direction], axis=1))
    p = inside(n)
    starts.append(p), ends.append(p + rng.uniform(-2.5, 2.5, (n, 2)))  # very short
    p = np.floor(inside(n)) + rng.uniform(0, 0.9, (n, 2))
    starts.append(p), ends.append(np.floor(p) + rng.uniform(0, 0.9, (n, 2)))  # zero length once truncated
    p = rng.uniform(-0.5, 0.5, (n, 2))  # around the origin: negative ends truncate towards zero
    starts.append(p), ends.append(p + rng.uniform(-20, 20, (n, 2)))
    starts.append(anywhere(n // 4) * [1, 0] + [0, -h]), ends.append(anywhere(n // 4) * [1, 0] + [0, 2 * h])  # long
    return np.concatenate(starts), np.concatenate(ends)


def colour_iou(ours: np.ndarray, reference: np.ndarray, colours: np.ndarray) -> list[float]:
    """Per colour: the IoU of the pixels of exactly that colour in both pictures (1 if neither has it)."""
    out = []
    for colour in colours:
        a, b = (ours == colour).all(-1), (reference == colour).all(-1)
        union = (a | b).sum()
        out.append(float((a & b).sum() / union) if union else 1.0)
    return out


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_matches_pil_per_colour(size):
    ious, differing, drawn = [], 0, 0
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        p0, p1 = random_segments(rng, size)
        ranks = rng.integers(0, len(COLOURS), len(p0))
        ours = our_lines(size, p0, p1, ranks, COLOURS)
        reference = pil_lines(size, p0, p1, ranks, COLOURS)
        ious.append(colour_iou(ours, reference, COLOURS))
        differing += int((ours != reference).any(-1).sum())
        drawn += int((ours.any(-1) | reference.any(-1)).sum())
    ious = np.array(ious)  # (seeds, colours)
    print(f"\n{size[0]}x{size[1]}, {len(SEEDS)} scenes: {differing} of {drawn} drawn pixels differ from PIL")
    for colour, column in zip(COLOURS, ious.T):
        print(f"  colour {tuple(colour.tolist())}: IoU min {column.min():.4f} mean {column.mean():.4f}")
    assert ious.min() >= MIN_IOU, f"per-colour IoU against PIL fell to {ious.min():.4f}"


@pytest.mark.parametrize("width", [1, 2, 4, 5, 8])
def test_other_widths_match_pil(width):
    rng = np.random.default_rng(100 + width)
    size = (304, 176)
    p0, p1 = random_segments(rng, size, n=20)
    ranks = rng.integers(0, len(COLOURS), len(p0))
    ious = colour_iou(our_lines(size, p0, p1, ranks, COLOURS, width), pil_lines(size, p0, p1, ranks, COLOURS, width), COLOURS)
    assert min(ious) >= MIN_IOU, ious


def test_every_short_segment_matches_pil():
    """Every integer direction up to 12 px: the quad's rounding and its scanline ends."""
    size = (40, 40)
    steps = np.array([(dx, dy) for dx in range(-12, 13) for dy in range(-12, 13)], dtype=float)
    for step in steps:
        p0 = np.array([[20.0, 20.0]])
        p1 = p0 + step
        ours = our_lines(size, p0, p1, [0], COLOURS)
        assert (ours == pil_lines(size, p0, p1, [0], COLOURS)).all(), f"segment (20, 20) -> {tuple(p1[0])}"


RED, GREEN = 0, 1


def crossing(ranks):
    """A horizontal and a vertical segment crossing at (30, 20), with the given ranks."""
    p0 = np.array([[10.0, 20.0], [30.0, 5.0]])
    p1 = np.array([[50.0, 20.0], [30.0, 40.0]])
    return our_lines((64, 48), p0, p1, np.array(ranks), COLOURS)


def test_higher_rank_on_top_at_a_crossing():
    assert tuple(crossing([RED, GREEN])[20, 30]) == tuple(COLOURS[GREEN])
    assert tuple(crossing([GREEN, RED])[20, 30]) == tuple(COLOURS[GREEN])
    # Swap which segment has the higher rank: the crossing changes colour.
    assert tuple(crossing([3, 2])[20, 30]) == tuple(COLOURS[3])
    assert tuple(crossing([2, 3])[20, 30]) == tuple(COLOURS[3])
    assert (crossing([3, 2]) != crossing([2, 3])).any()


def test_input_order_does_not_matter():
    rng = np.random.default_rng(7)
    size = (304, 176)
    p0, p1 = random_segments(rng, size, n=20)
    ranks = rng.integers(0, 3, len(p0))  # many equal ranks
    flip = rng.permutation(len(p0))
    assert (our_lines(size, p0, p1, ranks, COLOURS) == our_lines(size, p0[flip], p1[flip], ranks[flip], COLOURS)).all()


def test_views_and_untouched_pixels():
    canvases = np.full((2, 30, 40, 3), 77, dtype=np.uint8)
    draw_lines(canvases, np.array([1]), np.array([0]), np.array([[2.0, 2.0]]), np.array([[30.0, 20.0]]), COLOURS[:1])
    assert (canvases[0] == 77).all()
    painted = (canvases[1] != 77).any(-1)
    assert painted.sum() > 0 and (canvases[1][painted] == COLOURS[0]).all()
    draw_lines(canvases, np.zeros(0, int), np.zeros(0, int), np.zeros((0, 2)), np.zeros((0, 2)), COLOURS)  # nothing


def test_rejects_ranks_without_a_colour():
    canvas = np.zeros((1, 10, 10, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="ranks"):
        draw_lines(canvas, np.array([0]), np.array([2]), np.zeros((1, 2)), np.ones((1, 2)), COLOURS[:2])
