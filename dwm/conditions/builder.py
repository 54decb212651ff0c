"""Boxes, map lines and a camera rig -> the layout images and camera scalars the model takes.

Drawn as the reference draws, which is how the released model's training data was drawn:
- every segment as PIL's `ImageDraw.line(width=3)` at the rig's native image size (640x360
  for the nuScenes rigs), then a bilinear resize to the model resolution;
- boxes: 12 edges plus the two heading diagonals, in the world's actor order (a later actor
  paints over an earlier one, as the reference paints its actor list); an actor whose origin
  is farther than 80 m from the camera is left out;
- map: road edges first, then lane lines, then crosswalks (the colour table's order), so lane
  green lies over curb blue where they cross; cut at 65 m of camera depth;
- crosswalk outlines are drawn closed: the worlds give them as closed polygons, as the
  nuScenes training renderer draws them (the reference's Carla adapter left one side open).

Public use, with no world and no Observation:

    rig = CameraRig.from_intrinsics(K, ego_from_camera, image_size=(1600, 900))
    layout = ConditionBuilder(rig, resolution=(176, 304)).draw(boxes, map_lines)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from dwm.conditions.caption import caption, object_words
from dwm.conditions.colours import BOX_COLOURS, MAP_COLOURS
from dwm.conditions.frame import ConditionFrame, layout_floats
from dwm.conditions.packed import PackedConditions
from dwm.geometry.projection import BOX_EDGES, box_corners, project_segments
from dwm.geometry.raster import PEN_WIDTH, clip_to_window, draw_lines, visible_in_image
from dwm.world.rig import CameraRig
from dwm.world.base import Boxes, MapKind, MapLines, Observation

# The colour table row of a category that is not drawn (never painted: such boxes are dropped).
_NOT_DRAWN = np.zeros(3, dtype=np.uint8)
# Map kind code -> its rank in the drawing order of MAP_COLOURS, and the colours by rank.
_MAP_PALETTE = np.array(list(MAP_COLOURS.values()), dtype=np.uint8)
_MAP_DRAW_RANK = np.zeros(max(int(k) for k in MapKind) + 1, dtype=np.intp)
_MAP_DRAW_RANK[[int(k) for k in MAP_COLOURS]] = np.arange(len(MAP_COLOURS))
assert set(MAP_COLOURS) == set(MapKind) and len(_MAP_DRAW_RANK) == len(MapKind), "kinds 0..K-1, all coloured"


@dataclass
class Layout:
    """The layout of one moment in every view.

    box_images, map_images: (V, 3, H, W) float32 in [0, 1] at the builder's resolution.
    camera_params: (V, 11) float32, the model's camera scalars (`CAMERA_PARAM_NAMES`).
    objects: per view, the caption's object words ("roads" first when the map shows).
    """

    box_images: torch.Tensor
    map_images: torch.Tensor
    camera_params: torch.Tensor
    objects: list[list[str]]


@dataclass
class NativeLayout:
    """The layout of one frame at the rig's native image size, before the resize.

    boxes, maps: (V, H, W, 3) uint8 RGB. objects: per view, the caption's object words.
    """

    boxes: np.ndarray
    maps: np.ndarray
    objects: list[list[str]]


class ConditionBuilder:
    """Projects boxes and map lines into every camera of the rig and draws the layout.

    rig: a `CameraRig` (from K and poses, from fovs, or a rig config node, conf/rig/*.yaml).
    resolution: [H, W] of the layout images handed to the model (any size; drawing happens at
        the rig's native image size, where its intrinsics hold).
    fps: the fps camera scalar (the world's tick rate in lockstep).
    near_depth: m, segments are cut at this camera depth.
    box_far_depth: m, box edges are cut at this camera depth.
    box_max_distance: m, a box whose actor origin is farther from the camera is not drawn.
    map_far_depth: m, map lines are cut at this camera depth.
    pen_width: px at the native size, as PIL's `ImageDraw.line(width=...)` (the reference: 3
        at 640 px; its nuScenes training renderer: 8 at 1600 px).
    min_object_coverage: fraction of the image a box's 2D extent must exceed to be captioned.
    """

    def __init__(
        self,
        rig: Mapping | CameraRig,
        resolution=(176, 304),
        fps: float = 10.0,
        near_depth: float = 0.05,
        box_far_depth: float = 512.0,
        box_max_distance: float = 80.0,
        map_far_depth: float = 65.0,
        pen_width: int = PEN_WIDTH,
        min_object_coverage: float = 0.005,
    ):
        self.rig = rig if isinstance(rig, CameraRig) else CameraRig.from_config(rig)
        try:
            height, width = (int(r) for r in resolution)
            valid = height > 0 and width > 0 and [height, width] == list(resolution)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(f"resolution must be [H, W], two positive integers, got {resolution!r}")
        self.resolution = (height, width)
        if not (isinstance(fps, (int, float)) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        if not 0 < near_depth < min(box_far_depth, map_far_depth):
            raise ValueError(
                f"need 0 < near_depth < the far depths, got near_depth={near_depth}, "
                f"box_far_depth={box_far_depth}, map_far_depth={map_far_depth}"
            )
        if not box_max_distance > 0:
            raise ValueError(f"box_max_distance must be positive, got {box_max_distance}")
        if isinstance(pen_width, bool) or int(pen_width) != pen_width or pen_width < 1:
            raise ValueError(f"pen_width must be a positive integer (px), got {pen_width}")
        if not 0 <= min_object_coverage < 1:
            raise ValueError(f"min_object_coverage must be in [0, 1), got {min_object_coverage}")
        self.fps = float(fps)
        self.near_depth = float(near_depth)
        self.box_far_depth = float(box_far_depth)
        self.box_max_distance = float(box_max_distance)
        self.map_far_depth = float(map_far_depth)
        self.pen_width = int(pen_width)
        self.min_object_coverage = float(min_object_coverage)
        # Constant per rig: camera <- ego (V, 4, 4) and the camera scalars without fps.
        self._camera_from_ego = np.linalg.inv(self.rig.ego_from_camera)
        self._camera_params = self.rig.camera_params(self.fps)

    @classmethod
    def from_config(cls, cfg: Mapping, **overrides) -> "ConditionBuilder":
        """From the composed config: `rig`, `pipeline.resolution` ([H, W]) and the fps
        condition of `dwm.config.condition_fps` (1 / the world's tick; an explicit
        `pipeline.fps` must agree with it); keyword overrides go to the constructor (e.g.
        map_far_depth=80). A missing or disagreeing key raises a ValueError naming it."""
        from dwm.config import condition_fps

        try:
            rig, pipeline = cfg["rig"], cfg["pipeline"]
            kwargs = {"resolution": list(pipeline["resolution"])}
        except KeyError as err:
            needs = "rig, pipeline.resolution and the world's tick (world.dt or world.fixed_delta_seconds)"
            raise ValueError(f"config lacks {err}; the conditions need {needs}") from None
        if "fps" not in overrides:
            kwargs["fps"] = condition_fps(cfg)
        return cls(rig, **{**kwargs, **overrides})

    @property
    def num_views(self) -> int:
        return self.rig.num_views

    def draw(self, boxes: Boxes, map_lines: MapLines, ego_pose: np.ndarray | None = None) -> Layout:
        """The layout of boxes and map lines (world frame) seen from the rig on an ego at
        `ego_pose` (4, 4) world <- ego (rear axle on the ground; default: the identity, i.e.
        boxes and lines given in the ego frame)."""
        canvases, objects = self._render(np.eye(4) if ego_pose is None else ego_pose, boxes, map_lines)
        images = layout_floats(self._resize(canvases))
        return Layout(images[: self.num_views], images[self.num_views :], torch.from_numpy(self._camera_params.copy()), objects)

    def build(self, obs: Observation, fps: float | None = None) -> ConditionFrame:
        """The conditions of `obs` for every view; fps overrides the fps scalar (realtime clock)."""
        pixels, params, captions, cameras = self._moment(obs, fps)
        images = layout_floats(pixels)  # (2V, 3, H, W)
        return ConditionFrame(
            box_images=images[: self.num_views],
            map_images=images[self.num_views :],
            camera_params=torch.from_numpy(params),
            captions=captions,
            sim_time=float(obs.sim_time),
            camera_images=cameras,
        )

    def build_packed(self, obs: Observation, fps: float | None = None) -> PackedConditions:
        """`build(obs, fps)` packed, made without its float32 images: what the Serve app keeps
        for every frame in a queue (about 12 KB against about 4 MB at the default size)."""
        pixels, params, captions, cameras = self._moment(obs, fps)
        layout = np.concatenate([pixels[: self.num_views], pixels[self.num_views :]], axis=1)  # (V, 6, H, W)
        return PackedConditions.from_pixels(layout, params, captions, float(obs.sim_time), cameras)

    def _moment(self, obs: Observation, fps: float | None):
        """Layout pixels (2V, 3, H, W) uint8 (boxes then maps), camera scalars (V, 11)
        float32 (a new array), captions, the world's pictures (or None)."""
        canvases, objects = self._render(obs.ego_pose, obs.boxes, obs.map_lines)
        pixels = self._resize(canvases)
        params = self._camera_params.copy()
        if fps is not None and fps != self.fps:
            params[:, 0] = fps
        captions = [caption(obs.weather, obs.environment, words) for words in objects]
        return pixels, params, captions, self._camera_images(obs.camera_images)

    def _camera_images(self, pictures: dict[str, np.ndarray] | None) -> np.ndarray | None:
        """The world's pictures (camera name -> (h, w, 3) uint8) in view order, at the model
        resolution: (V, H, W, 3) uint8 (area-averaged when smaller), or None."""
        if not pictures:
            return None
        height, width = self.resolution
        missing = [name for name in self.rig.names if name not in pictures]
        if missing:
            raise ValueError(f"the world's pictures lack the rig's cameras {missing}; it has {sorted(pictures)}")
        return np.stack([cv2.resize(pictures[name], (width, height), interpolation=cv2.INTER_AREA)
                         for name in self.rig.names])

    def render(self, obs: Observation) -> NativeLayout:
        """Draw the box and map layouts of `obs` at the native size, and find each view's
        caption objects."""
        canvases, objects = self._render(obs.ego_pose, obs.boxes, obs.map_lines)
        return NativeLayout(boxes=canvases[0], maps=canvases[1], objects=objects)

    def _resize(self, canvases: np.ndarray) -> np.ndarray:
        """(2, V, h, w, 3) uint8 native canvases -> (2V, 3, H, W) uint8 at the resolution."""
        return resize_layout_pixels(canvases.reshape((2 * self.num_views,) + canvases.shape[2:]), self.resolution)

    def _render(self, ego_pose, boxes: Boxes, map_lines: MapLines) -> tuple[np.ndarray, list[list[str]]]:
        """Canvases (2, V, H, W, 3) uint8 (boxes, maps) and the caption objects per view."""
        ego_pose = np.asarray(ego_pose, dtype=np.float64)
        if ego_pose.shape != (4, 4) or not np.isfinite(ego_pose).all():
            raise ValueError(f"ego_pose must be a finite (4, 4) matrix, got shape {ego_pose.shape}")
        camera_from_world = self._camera_from_ego @ np.linalg.inv(ego_pose)  # (V, 4, 4)
        camera_positions = (ego_pose @ self.rig.ego_from_camera)[:, :3, 3]  # (V, 3) world, m
        width, height = self.rig.image_size
        canvases = np.zeros((2, self.num_views, height, width, 3), dtype=np.uint8)
        box_categories = self._draw_boxes(canvases[0], boxes, camera_from_world, camera_positions)
        roads = self._draw_map(canvases[1], map_lines, camera_from_world)
        objects = [object_words(cats, bool(road)) for cats, road in zip(box_categories, roads)]
        return canvases, objects

    def _project(
        self, camera_from_world: np.ndarray, starts: np.ndarray, ends: np.ndarray, far: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Project world segments starts -> ends (S, 3) into every view, cut at the near and
        far depths, and keep the (view, segment) pairs that reach the image.

        Returns views (n,), segment indices (n,), pixel ends p0, p1 (n, 2), ready to draw.
        """
        views, index, p0, p1 = project_segments(
            camera_from_world, self.rig.intrinsics, starts, ends, self.near_depth, far
        )
        width, height = self.rig.image_size
        shows, p0, p1 = clip_to_window(p0, p1, width, height, self.pen_width + 2)
        return views[shows], index[shows], p0, p1

    def _draw_boxes(
        self, canvases: np.ndarray, boxes: Boxes, camera_from_world: np.ndarray, camera_positions: np.ndarray
    ) -> list[list[str]]:
        """Draw boxes on canvases (V, H, W, 3), later boxes over earlier ones; returns per view
        the categories of the boxes covering enough of the image, nearest first."""
        views = self.num_views
        if len(boxes) == 0:
            return [[] for _ in range(views)]
        centers, sizes, rotations, origins = _box_arrays(boxes)
        categories = np.asarray(boxes.categories, dtype=str)
        colours = np.array([BOX_COLOURS.get(name, _NOT_DRAWN) for name in categories], dtype=np.uint8)  # (N, 3)
        known = np.array([name in BOX_COLOURS for name in categories])
        # The actor's origin decides whether a box is near enough, as in the reference.
        distance = np.linalg.norm(origins[None] - camera_positions[:, None], axis=-1)  # (V, N) m
        near = distance <= self.box_max_distance
        drawn = np.flatnonzero(known & near.any(axis=0))  # actor order kept
        categories, colours, distance, near = categories[drawn], colours[drawn], distance[:, drawn], near[:, drawn]

        corners = box_corners(centers[drawn], sizes[drawn], rotations[drawn])  # (N, 8, 3)
        starts = corners[:, BOX_EDGES[:, 0]].reshape(-1, 3)  # (N * 14, 3)
        ends = corners[:, BOX_EDGES[:, 1]].reshape(-1, 3)
        view_of, edge, p0, p1 = self._project(camera_from_world, starts, ends, self.box_far_depth)
        box = edge // len(BOX_EDGES)
        mine = near[view_of, box]  # the 80 m rule holds per camera
        view_of, box, p0, p1 = view_of[mine], box[mine], p0[mine], p1[mine]
        # Rank = place in the actor list: a later actor paints over an earlier one.
        draw_lines(canvases, view_of, box, p0, p1, colours, self.pen_width)

        # Caption: the 2D extent of each box's visible edges, as a share of the image.
        width, height = self.rig.image_size
        q0, q1, seen = visible_in_image(p0, p1, width, height)
        lo = np.full((views, len(categories), 2), np.inf)
        hi = np.full((views, len(categories), 2), -np.inf)
        np.minimum.at(lo, (view_of[seen], box[seen]), np.minimum(q0, q1)[seen])
        np.maximum.at(hi, (view_of[seen], box[seen]), np.maximum(q0, q1)[seen])
        extent = np.where(np.isfinite(lo), hi - lo, 0.0)  # (V, N, 2) px
        covered = extent[..., 0] * extent[..., 1] > self.min_object_coverage * width * height
        order = np.argsort(distance, axis=1, kind="stable")
        return [categories[order[v]][covered[v][order[v]]].tolist() for v in range(views)]

    def _draw_map(self, canvases: np.ndarray, lines: MapLines, camera_from_world: np.ndarray) -> np.ndarray:
        """Draw map lines on canvases (V, H, W, 3) in the kinds' drawing order; returns (V,)
        whether any line shows."""
        roads = np.zeros(self.num_views, dtype=bool)
        if len(lines) == 0:
            return roads
        starts, ends, kinds = _map_arrays(lines)
        view_of, index, p0, p1 = self._project(camera_from_world, starts, ends, self.map_far_depth)
        draw_lines(canvases, view_of, _MAP_DRAW_RANK[kinds[index]], p0, p1, _MAP_PALETTE, self.pen_width)
        width, height = self.rig.image_size
        roads[view_of[visible_in_image(p0, p1, width, height)[2]]] = True
        return roads


def _box_arrays(boxes: Boxes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = len(boxes)
    centers = np.asarray(boxes.centers, dtype=np.float64)
    sizes = np.asarray(boxes.sizes, dtype=np.float64)
    rotations = np.asarray(boxes.rotations, dtype=np.float64)
    origins = np.asarray(boxes.origins, dtype=np.float64)
    if centers.shape != (n, 3) or sizes.shape != (n, 3) or rotations.shape != (n, 3, 3) or origins.shape != (n, 3):
        raise ValueError(
            f"boxes must have centers (N, 3), sizes (N, 3), rotations (N, 3, 3), origins (N, 3) for N={n} "
            f"categories; got {centers.shape}, {sizes.shape}, {rotations.shape}, {origins.shape}"
        )
    return centers, sizes, rotations, origins


def _map_arrays(lines: MapLines) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    starts = np.asarray(lines.starts, dtype=np.float64)
    ends = np.asarray(lines.ends, dtype=np.float64)
    kinds = np.asarray(lines.kinds)
    s = len(kinds)
    if starts.shape != (s, 3) or ends.shape != (s, 3) or kinds.shape != (s,):
        raise ValueError(
            "map lines must have starts (S, 3), ends (S, 3), kinds (S,); "
            f"got {starts.shape}, {ends.shape}, {kinds.shape}"
        )
    allowed = ", ".join(f"{int(k)} ({k.name})" for k in MapKind)
    if kinds.dtype.kind not in "iu":
        raise ValueError(f"map line kinds must be integer MapKind codes, got dtype {kinds.dtype}; allowed: {allowed}")
    if s and (kinds.min() < 0 or kinds.max() >= len(_MAP_DRAW_RANK)):
        bad = sorted(set(kinds[(kinds < 0) | (kinds >= len(_MAP_DRAW_RANK))].tolist()))
        raise ValueError(f"unknown map line kind codes {bad}; allowed: {allowed}")
    return starts, ends, kinds


def resize_layout_pixels(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, h, w) uint8, size = (h, w).

    Antialiased bilinear on uint8, which is PIL's bilinear resize (the reference's
    torchvision `Resize` on PIL images) to within one grey level.
    """
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # channels-last view, no copy
    if tuple(pixels.shape[-2:]) != tuple(size):
        pixels = F.interpolate(pixels, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(pixels.numpy())


def resize_layouts(images: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, h, w) float32 in [0, 1], size = (h, w): the layout
    images the model takes (`resize_layout_pixels`, then `layout_floats`)."""
    return layout_floats(resize_layout_pixels(images, size))
