"""Cameras for the embedded world: a rasterised RGB picture of the 3D scene for each camera of
the rig, the embedded world's equivalent of Carla's RGB cameras.

What is drawn, back to front: sky and the ground beyond the road (colours from the sun's
altitude, clouds, rain and fog), the road surface (every lane as ground quads), lane lines and
road edges as painted strips on it, zebra stripes in crosswalks, then the vehicles as shaded
boxes (one paint colour per vehicle, lit by the sun; a truck is taller because its box is).
Every piece is a convex polygon, clipped at the near plane and filled with no loop over
polygons (`dwm.geometry.raster.fill_polygons`); the farther vehicle is painted first.

Frames: world right-handed (x forward, y left, z up, m), cameras OpenCV (`dwm.world.rig`).
The ground is the plane z = 0 of the ego frame (the embedded maps are flat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dwm.geometry.projection import BOX_FACE_NORMALS, BOX_FACES, box_corners, clip_polygons_near, transform_points
from dwm.geometry.raster import fill_polygons
from dwm.world.base import Boxes, MapKind, MapLines, Weather
from dwm.world.rig import CameraRig

NEAR_M = 0.3  # polygons are clipped this far in front of a camera
FAR_M = 250.0  # nothing farther is drawn (the world observes 120 m around the ego by default)
LANE_LINE_WIDTH_M = 0.15
ROAD_EDGE_WIDTH_M = 0.25
STRIPE_WIDTH_M = 0.5  # zebra stripes: 0.5 m of paint, 0.5 m of road, across the road

# Paint colours of vehicles (RGB, 0..1): the common colours of cars on the road. A vehicle
# keeps its paint (its index modulo the table) for its whole life.
VEHICLE_PAINTS = np.array(
    [
        [0.92, 0.92, 0.90],  # white
        [0.08, 0.08, 0.09],  # black
        [0.62, 0.63, 0.65],  # silver
        [0.35, 0.36, 0.38],  # grey
        [0.70, 0.08, 0.07],  # red
        [0.10, 0.22, 0.55],  # blue
        [0.05, 0.12, 0.30],  # dark blue
        [0.12, 0.35, 0.18],  # green
        [0.85, 0.65, 0.10],  # yellow
        [0.45, 0.28, 0.15],  # brown
    ]
)

_ROAD = np.array([0.30, 0.30, 0.32])
_WET_ROAD = np.array([0.16, 0.17, 0.19])
_PAINT = np.array([0.93, 0.93, 0.90])
_GRASS = np.array([0.30, 0.42, 0.20])
_SKY_ZENITH = np.array([0.25, 0.47, 0.85])
_SKY_HORIZON = np.array([0.70, 0.82, 0.95])
_NIGHT_ZENITH = np.array([0.01, 0.02, 0.06])
_NIGHT_HORIZON = np.array([0.06, 0.07, 0.12])
_CLOUD = np.array([0.72, 0.74, 0.77])
_FOG = np.array([0.75, 0.76, 0.78])
_SUN_AZIMUTH = math.radians(135.0)  # where the sun stands, world frame (fixed: the world has no clock of day)


@dataclass(frozen=True)
class Lighting:
    """What the weather does to the picture: `light` scales lit surfaces (1: a sunny day,
    about 0.1 at night); colours are RGB in 0..1 before `light`; fog_per_m: the share of
    fog colour is 1 - exp(-fog_per_m * distance)."""

    light: float
    sun: np.ndarray  # (3,) unit vector towards the sun, world frame
    sky_zenith: np.ndarray
    sky_horizon: np.ndarray
    ground: np.ndarray
    road: np.ndarray
    fog: np.ndarray
    fog_per_m: float

    @staticmethod
    def of(weather: Weather) -> "Lighting":
        altitude = math.radians(max(min(weather.sun_altitude_angle, 90.0), -90.0))
        clouds = min(max(weather.cloudiness, 0.0), 100.0) / 100.0
        rain = min(max(weather.precipitation, 0.0), 100.0) / 100.0
        fog = min(max(weather.fog_density, 0.0), 100.0) / 100.0
        # Daylight: full from 15 degrees up, dusk below, night (0.1) from 6 degrees under the horizon.
        day = min(max((weather.sun_altitude_angle + 6.0) / 21.0, 0.0), 1.0)
        light = (0.1 + 0.9 * day) * (1.0 - 0.35 * clouds) * (1.0 - 0.3 * rain)
        overcast = max(clouds, rain)
        zenith = _NIGHT_ZENITH + day * (_SKY_ZENITH - _NIGHT_ZENITH)
        horizon = _NIGHT_HORIZON + day * (_SKY_HORIZON - _NIGHT_HORIZON)
        grey = _CLOUD * (0.15 + 0.85 * day)
        sun = np.array([math.cos(altitude) * math.cos(_SUN_AZIMUTH), math.cos(altitude) * math.sin(_SUN_AZIMUTH),
                        math.sin(altitude)])
        return Lighting(
            light=light,
            sun=sun,
            sky_zenith=zenith + overcast * (grey - zenith),
            sky_horizon=horizon + overcast * (grey - horizon),
            ground=_GRASS,
            road=_ROAD + rain * (_WET_ROAD - _ROAD),
            fog=_FOG * (0.15 + 0.85 * day),
            fog_per_m=0.06 * fog**2 + 0.004 * rain,
        )

    def fogged(self, colours: np.ndarray, distance: np.ndarray) -> np.ndarray:
        """Lit colours (..., 3) in 0..1 seen from `distance` (...) m: fog blended in."""
        share = 1.0 - np.exp(-self.fog_per_m * distance)[..., None]
        return colours + share * (self.fog - colours)


class SceneCamera:
    """The rig's cameras drawing the embedded world's scene: `render` gives (V, H, W, 3) uint8
    RGB, one picture per camera in rig order, at the rig's native size (or `size` (W, H))."""

    def __init__(self, rig: CameraRig, size: tuple[int, int] | None = None):
        self.rig = rig.resized(size) if size is not None else rig
        width, height = self.rig.image_size
        # Each pixel's viewing ray in the ego frame (V, H, W, 3), for the sky and the ground
        # beyond the road: elevation above the horizon and distance to the ground plane.
        u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
        pixels = np.stack([u, v, np.ones_like(u)], axis=-1)  # (H, W, 3)
        rays = pixels @ np.linalg.inv(self.rig.intrinsics).transpose(0, 2, 1)[:, None]  # (V, H, W, 3) camera
        rays = rays @ self.rig.ego_from_camera[:, None, :3, :3].transpose(0, 1, 3, 2)  # ego frame
        rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
        heights = self.rig.ego_from_camera[:, 2, 3]  # (V,) m above the ground
        self._elevation = np.arcsin(np.clip(rays[..., 2], -1.0, 1.0))  # (V, H, W) rad
        with np.errstate(divide="ignore"):
            self._ground_m = np.where(rays[..., 2] < 0, heights[:, None, None] / -rays[..., 2], np.inf)
        self._backgrounds: dict[Weather, np.ndarray] = {}

    @property
    def image_size(self) -> tuple[int, int]:
        return self.rig.image_size

    def render(
        self,
        ego_pose: np.ndarray,
        boxes: Boxes,
        paints: np.ndarray,
        map_lines: MapLines,
        road: np.ndarray,
        weather: Weather,
    ) -> np.ndarray:
        """The pictures of one moment.

        ego_pose (4, 4) world <- ego; boxes: the vehicles around (world frame), paints (N,) int
        their paint (index into `VEHICLE_PAINTS`, taken modulo its length); map_lines: lane
        lines, road edges and crosswalk outlines (world frame); road: the road surface's ground
        quads (Q, 4, 3) world frame, those near the ego. Returns (V, H, W, 3) uint8.
        """
        lighting = Lighting.of(weather)
        canvases = self._background(weather, lighting).copy()
        camera_from_world = np.linalg.inv(ego_pose @ self.rig.ego_from_camera)  # (V, 4, 4)
        ground, ground_colours = self._ground_polygons(map_lines, road, lighting)
        faces, face_colours, face_centres = self._box_faces(boxes, paints, lighting)
        n_views = self.rig.num_views
        # Every polygon in every camera: (V, n, k, 3) camera coordinates, clipped, projected.
        polygons, colours, depth, views = [], [], [], []
        for points, tint, centres, on_top in ((ground, ground_colours, None, False), (faces, face_colours, face_centres, True)):
            if len(points) == 0:
                continue
            cam = transform_points(camera_from_world, points)  # (V, n, 4, 3)
            centre = cam.mean(axis=2) if centres is None else transform_points(camera_from_world, centres)
            distance = np.linalg.norm(centre, axis=-1)  # (V, n) m
            keep = (distance < FAR_M) & (cam[..., 2].max(axis=2) > NEAR_M)
            if on_top:  # a face is seen from its outer side only (the box hides the others)
                normal = np.cross(cam[..., 1, :] - cam[..., 0, :], cam[..., 2, :] - cam[..., 1, :])
                keep &= np.sum(normal * cam[..., 0, :], axis=-1) > 0  # the faces' corners turn clockwise outside
            view, index = np.nonzero(keep)
            clipped, inside = clip_polygons_near(cam[view, index], NEAR_M)
            projected = self._project(view[inside], clipped[inside])
            shown = self._on_image(projected)
            view, index = view[inside][shown], index[inside][shown]
            polygons.append(projected[shown])
            colours.append(lighting.fogged(tint[index] * lighting.light, distance[view, index]))
            # Ground pieces under everything (in their given order); faces farthest first.
            depth.append(np.full(len(view), np.inf) if not on_top else distance[view, index])
            views.append(view)
        if polygons:
            k = max(p.shape[1] for p in polygons)
            polygons = np.concatenate([np.concatenate([p, np.repeat(p[:, -1:], k - p.shape[1], axis=1)], axis=1)
                                       for p in polygons])
            colours, depth, views = np.concatenate(colours), np.concatenate(depth), np.concatenate(views)
            order = np.argsort(-depth, kind="stable")  # rank = painting order
            ranks = np.empty(len(order), dtype=np.int64)
            ranks[order] = np.arange(len(order))
            palette = np.clip(np.rint(colours[order] * 255.0), 0, 255).astype(np.uint8)
            fill_polygons(canvases, views, ranks, polygons, palette)
        assert canvases.shape[0] == n_views
        return canvases

    # ------------------------------------------------------------------ parts

    def _background(self, weather: Weather, lighting: Lighting) -> np.ndarray:
        """Sky above the horizon, grass below, fogged with distance: (V, H, W, 3) uint8."""
        if weather not in self._backgrounds:
            up = np.clip(self._elevation / (math.pi / 2), 0.0, 1.0)[..., None] ** 0.6
            sky = lighting.sky_horizon + up * (lighting.sky_zenith - lighting.sky_horizon)
            ground = lighting.fogged(np.broadcast_to(lighting.ground * lighting.light, sky.shape),
                                     np.minimum(self._ground_m, 1e4))
            # The horizon itself is the fog's (or the haze's) colour: the ground fades into it.
            haze = 1.0 - np.exp(-np.minimum(self._ground_m, 1e4) / 2500.0)[..., None]
            ground = ground + haze * (sky - ground)
            picture = np.where((self._elevation > 0)[..., None], sky, ground)
            self._backgrounds[weather] = np.clip(np.rint(picture * 255.0), 0, 255).astype(np.uint8)
        return self._backgrounds[weather]

    def _ground_polygons(self, map_lines: MapLines, road: np.ndarray, lighting: Lighting):
        """Road quads, then painted strips over them: (n, 4, 3) world, colours (n, 3)."""
        strips = [np.asarray(road, dtype=np.float64).reshape(-1, 4, 3)]
        tints = [np.broadcast_to(lighting.road, (len(strips[0]), 3))]
        for kind, width in ((MapKind.ROAD_EDGE, ROAD_EDGE_WIDTH_M), (MapKind.LANE_LINE, LANE_LINE_WIDTH_M)):
            rows = map_lines.kinds == kind
            strip = _strips(map_lines.starts[rows], map_lines.ends[rows], width)
            strips.append(strip)
            tints.append(np.broadcast_to(_PAINT, (len(strip), 3)))
        stripes = _zebra_stripes(map_lines)
        strips.append(stripes)
        tints.append(np.broadcast_to(_PAINT, (len(stripes), 3)))
        return np.concatenate(strips), np.concatenate(tints)

    def _box_faces(self, boxes: Boxes, paints: np.ndarray, lighting: Lighting):
        """Every face of every box: (6N, 4, 3) world corners, lit colours (6N, 3), box centres (6N, 3)."""
        if len(boxes) == 0:
            return np.zeros((0, 4, 3)), np.zeros((0, 3)), np.zeros((0, 3))
        corners = box_corners(boxes.centers, boxes.sizes, boxes.rotations)  # (N, 8, 3)
        faces = corners[:, BOX_FACES]  # (N, 6, 4, 3)
        normals = BOX_FACE_NORMALS @ boxes.rotations.transpose(0, 2, 1)  # (N, 6, 3) world
        paint = VEHICLE_PAINTS[np.asarray(paints, dtype=np.int64) % len(VEHICLE_PAINTS)]  # (N, 3)
        # Lambert's sun plus sky light from above: the roof is the brightest face.
        shade = 0.45 + 0.35 * np.clip(normals @ lighting.sun, 0.0, None) + 0.2 * np.clip(normals[..., 2], 0.0, None)
        colours = paint[:, None, :] * shade[..., None]
        centres = np.repeat(boxes.centers[:, None], 6, axis=1)
        return faces.reshape(-1, 4, 3), colours.reshape(-1, 3), centres.reshape(-1, 3)

    def _project(self, views: np.ndarray, points: np.ndarray) -> np.ndarray:
        """Camera points (n, k, 3) in front of the near plane -> pixels (n, k, 2)."""
        k = self.rig.intrinsics[views]  # (n, 3, 3)
        pixels = points @ k.transpose(0, 2, 1)
        return pixels[..., :2] / pixels[..., 2:] - 0.5  # pixel centres at integers

    def _on_image(self, polygons: np.ndarray) -> np.ndarray:
        width, height = self.rig.image_size
        lo, hi = polygons.min(axis=1), polygons.max(axis=1)
        return (hi[:, 0] >= 0) & (lo[:, 0] <= width - 1) & (hi[:, 1] >= 0) & (lo[:, 1] <= height - 1)


def _strips(starts: np.ndarray, ends: np.ndarray, width: float) -> np.ndarray:
    """Painted strips of `width` m along ground segments (S, 3): quads (S, 4, 3)."""
    direction = ends[:, :2] - starts[:, :2]
    length = np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-9)
    side = np.concatenate([-direction[:, 1:] / length, direction[:, :1] / length, np.zeros_like(length)], axis=1)
    side *= width / 2.0
    return np.stack([starts + side, ends + side, ends - side, starts - side], axis=1)


def _zebra_stripes(map_lines: MapLines) -> np.ndarray:
    """Zebra stripes (n, 4, 3) in the crosswalks of `map_lines`: each crosswalk outline of four
    corners (four segments, each ending where the next starts) is a rectangle whose short sides
    run along the road; the stripes run along the road too, every 2 x STRIPE_WIDTH_M across it."""
    rows = np.flatnonzero(map_lines.kinds == MapKind.CROSSWALK)
    if len(rows) < 4:
        return np.zeros((0, 4, 3))
    starts, ends = map_lines.starts[rows], map_lines.ends[rows]
    # Outlines of four segments in a row: each ends where the next starts, the last where the first starts.
    first = np.arange(len(rows) - 3)
    closed = np.linalg.norm(ends[first + 3] - starts[first], axis=1) < 1e-6
    for j in range(3):
        closed &= np.linalg.norm(ends[first + j] - starts[first + j + 1], axis=1) < 1e-6
    stripes = []
    for i in first[closed]:
        c = starts[i: i + 4]  # corners in a cycle
        if np.linalg.norm(c[1] - c[0]) < np.linalg.norm(c[2] - c[1]):
            origin, along, across = c[0], c[1] - c[0], c[2] - c[1]  # the short side runs along the road
        else:
            origin, along, across = c[1], c[2] - c[1], c[0] - c[1]
        width = np.linalg.norm(across)
        count = int(width // (2 * STRIPE_WIDTH_M))
        if count == 0:
            continue
        step = across / width
        t = (np.arange(count) * 2 + 0.5) * STRIPE_WIDTH_M  # m across, each stripe's near side
        near_side = origin + t[:, None] * step
        far_side = near_side + STRIPE_WIDTH_M * step
        stripes.append(np.stack([near_side, near_side + along, far_side + along, far_side], axis=1))
    return np.concatenate(stripes) if stripes else np.zeros((0, 4, 3))
