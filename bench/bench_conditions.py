"""Conditions of one frame: the vectorised ConditionBuilder against a per-segment loop.

The loop is the reference's way (one Python iteration per box edge and per map segment:
project both ends, clip to the depth planes, draw with one PIL `ImageDraw.line(width=3)`
call, the reference's own drawing call), on the same rig, the same synthetic highway scene
and the same resize, so both must draw the same pixels.

    .venv/bin/python -m bench.bench_conditions [--repeats 50] [--rig nusc_3views]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from dwm.conditions.builder import ConditionBuilder
from dwm.conditions.colours import BOX_COLOURS, MAP_COLOURS
from dwm.geometry.projection import BOX_EDGES, box_corners
from dwm.conditions.builder import resize_layouts
from dwm.world.base import Boxes, MapKind, MapLines, Observation, Weather

CONF = pathlib.Path(__file__).resolve().parents[1] / "conf"


def highway_scene(seed: int = 0, half_length: float = 120.0, boxes: int = 25) -> Observation:
    """Two 4-lane carriageways (3.5 m lanes, lines every 1 m over +-half_length m around the
    ego), two closed crosswalk outlines, and `boxes` cars and trucks in the lanes."""
    rng = np.random.default_rng(seed)
    xs = np.arange(-half_length, half_length, 1.0)
    line_ys = {-7.0: MapKind.ROAD_EDGE, -3.5: MapKind.LANE_LINE, 0.0: MapKind.LANE_LINE, 3.5: MapKind.LANE_LINE,
               7.0: MapKind.ROAD_EDGE, 9.0: MapKind.ROAD_EDGE, 12.5: MapKind.LANE_LINE, 16.0: MapKind.LANE_LINE,
               19.5: MapKind.LANE_LINE, 23.0: MapKind.ROAD_EDGE}
    starts, ends, kinds = [], [], []
    for y, kind in line_ys.items():
        s = np.stack([xs, np.full_like(xs, y), np.zeros_like(xs)], axis=1)
        starts.append(s)
        ends.append(s + [1.0, 0.0, 0.0])
        kinds.append(np.full(len(xs), int(kind)))
    for x0 in (30.0, -40.0):
        corners = np.array([[x0, -7, 0], [x0 + 4, -7, 0], [x0 + 4, 23, 0], [x0, 23, 0]], dtype=float)
        starts.append(corners)
        ends.append(np.roll(corners, -1, axis=0))
        kinds.append(np.full(4, int(MapKind.CROSSWALK)))
    lines = MapLines(np.concatenate(starts), np.concatenate(ends), np.concatenate(kinds))

    lane_centres = np.array([-5.25, -1.75, 1.75, 5.25, 10.75, 14.25, 17.75, 21.25])
    categories = [str(c) for c in rng.choice(["car", "car", "truck"], boxes)]
    sizes = np.array([[4.6, 1.9, 1.6] if c == "car" else [9.0, 2.5, 3.6] for c in categories])
    centers = np.stack(
        [rng.uniform(-100, 100, boxes), rng.choice(lane_centres, boxes) + rng.normal(0, 0.2, boxes), sizes[:, 2] / 2],
        axis=1,
    )
    yaws = rng.normal(0, 0.03, boxes) + np.where(centers[:, 1] > 8.0, np.pi, 0.0)  # oncoming on the far side
    ego_pose = np.eye(4)
    ego_pose[:3, 3] = [0.0, -1.75, 0.0]  # rear axle on the ground, second lane from the right
    return Observation(
        ego_id="bench",
        sim_time=0.0,
        ego_pose=ego_pose,
        ego_speed=25.0,
        boxes=Boxes.upright(centers, sizes, yaws, categories),
        map_lines=lines,
        weather=Weather(),
        environment="A multi-lane highway.",
    )


class PerSegmentLoop:
    """The reference's renderer shape: a Python iteration per box edge and per map segment.

    bulk_transform=False: each iteration moves both ends into the camera, clips, divides and
    draws (one PIL `ImageDraw.line`, as the reference). bulk_transform=True: as the reference's
    own renderer, all points of a view go into the camera with one matrix product first, and
    the loop only clips, divides and draws.
    """

    def __init__(self, builder: ConditionBuilder, bulk_transform: bool):
        self.b = builder
        self.bulk_transform = bulk_transform

    @staticmethod
    def _clip_depth(a, b, near, far):
        # The reference's project_line: move an end across a depth plane by interpolation.
        for plane, outside in ((near, lambda z: z < near), (far, lambda z: z > far)):
            if outside(a[2]) and outside(b[2]):
                return None
            if outside(a[2]):
                a = a + (plane - a[2]) / (b[2] - a[2]) * (b - a)
            elif outside(b[2]):
                b = b + (plane - b[2]) / (a[2] - b[2]) * (a - b)
        return a, b

    @staticmethod
    def _clip_window(p, q, width, height):
        # Scalar Liang-Barsky to the window the vectorised path uses (PIL casts ends to int).
        t0, t1, d = 0.0, 1.0, q - p
        for axis, lo, hi in ((0, -width, 2 * width), (1, -height, 2 * height)):
            for num, den in ((p[axis] - lo, -d[axis]), (hi - p[axis], d[axis])):
                if den == 0:
                    if num < 0:
                        return None
                    continue
                t = num / den
                if den < 0:
                    t0 = max(t0, t)
                else:
                    t1 = min(t1, t)
        if t0 > t1:
            return None
        return p + t0 * d, p + t1 * d

    def _line(self, draw: ImageDraw.ImageDraw, a, b, near, far, colour):
        """a, b: homogeneous pixels (u z, v z, z) of the two ends."""
        clipped = self._clip_depth(a, b, near, far)
        if clipped is None:
            return
        a, b = clipped
        width, height = self.b.rig.image_size
        clipped = self._clip_window(a[:2] / a[2], b[:2] / b[2], width, height)
        if clipped is None:
            return
        p, q = clipped
        draw.line([(p[0], p[1]), (q[0], q[1])], fill=tuple(colour), width=self.b.pen_width)  # PIL truncates

    def render(self, obs: Observation) -> np.ndarray:
        b, rig = self.b, self.b.rig
        width, height = rig.image_size
        images = [[Image.new("RGB", (width, height)) for _ in range(rig.num_views)] for _ in range(2)]
        corners = box_corners(obs.boxes.centers, obs.boxes.sizes, obs.boxes.rotations)  # (N, 8, 3)
        lines = obs.map_lines
        box_order = [i for i, name in enumerate(obs.boxes.categories) if name in BOX_COLOURS]  # actor order
        kind_order = {int(kind): i for i, kind in enumerate(MAP_COLOURS)}
        map_order = sorted(range(len(lines)), key=lambda i: kind_order[int(lines.kinds[i])])
        for view in range(rig.num_views):
            draw_boxes, draw_map = ImageDraw.Draw(images[0][view]), ImageDraw.Draw(images[1][view])
            world_from_camera = obs.ego_pose @ rig.ego_from_camera[view]
            pixels_from_world = rig.intrinsics[view] @ np.linalg.inv(world_from_camera)[:3]  # (3, 4)
            m, t = pixels_from_world[:, :3], pixels_from_world[:, 3]
            if self.bulk_transform:
                box_points = corners @ m.T + t
                starts, ends = lines.starts @ m.T + t, lines.ends @ m.T + t
            for i in box_order:
                if np.linalg.norm(obs.boxes.origins[i] - world_from_camera[:3, 3]) > b.box_max_distance:
                    continue
                colour = BOX_COLOURS[obs.boxes.categories[i]]
                for e0, e1 in BOX_EDGES:
                    if self.bulk_transform:
                        p, q = box_points[i, e0], box_points[i, e1]
                    else:
                        p, q = m @ corners[i, e0] + t, m @ corners[i, e1] + t
                    self._line(draw_boxes, p, q, b.near_depth, b.box_far_depth, colour)
            for i in map_order:
                colour = MAP_COLOURS[MapKind(int(lines.kinds[i]))]
                if self.bulk_transform:
                    p, q = starts[i], ends[i]
                else:
                    p, q = m @ lines.starts[i] + t, m @ lines.ends[i] + t
                self._line(draw_map, p, q, b.near_depth, b.map_far_depth, colour)
        return np.stack([np.stack([np.asarray(image) for image in kind]) for kind in images])

    def build(self, obs: Observation) -> torch.Tensor:
        canvases = self.render(obs)
        return resize_layouts(canvases.reshape((-1,) + canvases.shape[2:]), self.b.resolution)


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """ms per call of each function, timed in turns so that all see the same machine load."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timing rounds")
    parser.add_argument("--rig", default="nusc_3views", help="a rig config under conf/rig")
    args = parser.parse_args()

    rig = OmegaConf.load(CONF / "rig" / f"{args.rig}.yaml")
    pipeline = OmegaConf.load(CONF / "pipeline" / "default.yaml")
    cfg = OmegaConf.create({"rig": rig, "pipeline": pipeline, "world": {"dt": 0.1}})  # a 10 Hz world
    builder = ConditionBuilder.from_config(cfg)
    loops = {
        "loop, projection per segment": PerSegmentLoop(builder, bulk_transform=False),
        "loop, bulk transform (ref. renderer)": PerSegmentLoop(builder, bulk_transform=True),
    }
    obs = highway_scene()

    # Same pixels? Native canvases, then the model-resolution tensors.
    layout = builder.render(obs)
    native = np.stack([layout.boxes, layout.maps])
    frame = builder.build(obs)
    resized = torch.cat([frame.box_images, frame.map_images])
    checks = []
    for name, loop in loops.items():
        other = loop.render(obs)
        drawn = (native.any(-1) | other.any(-1)).sum()
        differ = (native != other).any(-1).sum()
        diff = (resized - loop.build(obs)).abs()
        checks.append(f"{name}: {differ} of {drawn} drawn native pixels differ; "
                      f"model-resolution max abs diff {diff.max():.4f}, mean {diff.mean():.6f}")

    vectorised = "vectorised (ConditionBuilder)"
    stages = {
        # The whole frame: layouts drawn, resized to the model resolution, camera scalars.
        "build": {**{name: (lambda loop=loop: loop.build(obs)) for name, loop in loops.items()},
                  vectorised: lambda: builder.build(obs)},
        # Projection and drawing at the native size only (no resize, which both share).
        "render": {**{name: (lambda loop=loop: loop.render(obs)) for name, loop in loops.items()},
                   vectorised: lambda: builder.render(obs)},
    }
    times = {stage: interleaved(fns, args.repeats) for stage, fns in stages.items()}

    print(f"scene: {len(obs.map_lines)} map segments, {len(obs.boxes)} boxes; rig {args.rig} ({builder.num_views} "
          f"views), drawn at {builder.rig.image_size[0]}x{builder.rig.image_size[1]}, resized to "
          f"{builder.resolution[1]}x{builder.resolution[0]}; torch threads {torch.get_num_threads()}; "
          f"{args.repeats} interleaved rounds")
    print(f"{'stage':<8}{'method':<40}{'median ms':>10}{'p90 ms':>10}{'vectorised is x faster':>24}")
    for stage, stage_times in times.items():
        vec_ms = statistics.median(stage_times[vectorised])
        for name, ms in stage_times.items():
            median = statistics.median(ms)
            print(f"{stage:<8}{name:<40}{median:>10.2f}{np.percentile(ms, 90):>10.2f}{median / vec_ms:>24.1f}")
    for line in checks:
        print("same pixels, " + line)
    print(f"captions: {frame.captions}")


if __name__ == "__main__":
    main()
