"""The embedded world's cameras: what a driver would expect to see in each camera's picture."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dwm.config import compose
from dwm.geometry.projection import clip_polygons_near
from dwm.geometry.raster import fill_polygons
from dwm.video.compose import compose_strip
from dwm.world.base import Boxes, MapLines, Weather
from dwm.world.camera import VEHICLE_PAINTS, SceneCamera
from dwm.world.embedded import EmbeddedWorld
from dwm.world.rig import CameraRig

RIG = compose([]).rig
FRONT = 1  # CAM_FRONT in nusc_3views


@pytest.fixture(scope="module")
def camera() -> SceneCamera:
    return SceneCamera(CameraRig.from_config(RIG))


def pixel_of(camera: SceneCamera, view: int, point) -> tuple[int, int]:
    """(x, y) px of an ego-frame point in a view."""
    rig = camera.rig
    p = np.linalg.inv(rig.ego_from_camera[view]) @ np.append(point, 1.0)
    uv = rig.intrinsics[view] @ p[:3]
    return int(round(uv[0] / uv[2] - 0.5)), int(round(uv[1] / uv[2] - 0.5))


def road_ahead(length: float = 150.0, width: float = 8.0) -> np.ndarray:
    """One lane-wide road straight ahead of the ego, as ground quads (n, 4, 3)."""
    x = np.arange(-10.0, length, 5.0)
    quads = [[[a, width / 2, 0], [a + 5, width / 2, 0], [a + 5, -width / 2, 0], [a, -width / 2, 0]] for a in x]
    return np.array(quads, dtype=np.float64)


def car(x: float, y: float = 0.0, length=4.5, width=1.9, height=1.5) -> tuple:
    """(centre, size) of a box standing on the ground, heading along x."""
    return (x, y, height / 2), (length, width, height)


def boxes_of(*cars: tuple) -> Boxes:
    if not cars:
        return Boxes.empty()
    return Boxes.upright(centers=[c for c, _ in cars], sizes=[s for _, s in cars], yaws=[0.0] * len(cars),
                         categories=["car"] * len(cars))


def render(camera, boxes=None, paints=(), lines=None, road=None, weather=Weather()):
    return camera.render(np.eye(4), boxes if boxes is not None else Boxes.empty(), np.asarray(paints, dtype=np.int64),
                         lines if lines is not None else MapLines.empty(),
                         road if road is not None else np.zeros((0, 4, 3)), weather)


def test_sky_above_the_horizon_grass_beside_the_road_and_road_below_ahead(camera):
    images = render(camera, road=road_ahead())
    width, height = camera.image_size
    assert images.shape == (3, height, width, 3) and images.dtype == np.uint8
    front = images[FRONT].astype(int)
    sky, road = front[5, width // 2], front[height - 5, width // 2]
    assert sky[2] > sky[0] + 60  # blue
    assert np.ptp(road) < 10 and 40 < road.mean() < 140  # grey asphalt
    grass = images[0, height - 5, 5].astype(int)  # the left camera, low on its left: beside the road
    assert grass[1] > grass[0] + 20 and grass[1] > grass[2] + 20


def test_a_car_ahead_is_painted_in_its_own_paint_where_its_box_projects_and_hides_the_one_behind(camera):
    x, y = pixel_of(camera, FRONT, [12.0, 0.0, 0.75])
    red, blue = 4, 5
    alone = render(camera, boxes_of(car(12.0)), [red], road=road_ahead())[FRONT, y, x].astype(int)
    assert alone[0] > 2 * alone[2] and alone[0] > 2 * alone[1]
    alone_blue = render(camera, boxes_of(car(12.0)), [blue], road=road_ahead())[FRONT, y, x].astype(int)
    assert alone_blue[2] > 2 * alone_blue[0]
    # A truck farther ahead on the same line is hidden where the car is, whatever the order given.
    truck = car(25.0, length=10.0, width=2.5, height=3.8)
    for order in ((car(12.0), truck), (truck, car(12.0))):
        paints = [red, blue] if order[0][0][0] == 12.0 else [blue, red]
        picture = render(camera, boxes_of(*order), paints, road=road_ahead())
        assert np.array_equal(picture[FRONT, y, x], render(camera, boxes_of(car(12.0)), [red], road=road_ahead())[FRONT, y, x])
        tx, ty = pixel_of(camera, FRONT, [25.0, 0.0, 3.5])  # the truck's top shows above the car
        assert picture[FRONT, ty, tx, 2] > 2 * picture[FRONT, ty, tx, 0]
    # Behind the ego: in no front camera.
    behind = render(camera, boxes_of(car(-12.0)), [red], road=road_ahead())
    assert np.array_equal(behind, render(camera, road=road_ahead()))


def test_a_car_alongside_cut_by_the_near_plane_is_still_drawn_in_the_side_camera(camera):
    side = render(camera, boxes_of(car(1.0, 3.0)), [4])  # beside the ego on its left, partly behind the cameras
    empty = render(camera)
    changed = np.any(side[0] != empty[0], axis=-1).mean()
    assert changed > 0.1  # a large part of the left camera's picture is that car
    assert np.array_equal(side[2], empty[2])  # the right camera does not see it


def test_lane_lines_road_edges_and_zebra_stripes_are_white_paint_on_the_road(camera):
    edges = [[x, s * 4.0, 0.0] for x in range(0, 60, 5) for s in (-1, 1)]
    starts = np.array(edges, dtype=float)
    ends = starts + [5.0, 0.0, 0.0]
    crossing = np.array([[20.0, 4.0, 0], [24.0, 4.0, 0], [24.0, -4.0, 0], [20.0, -4.0, 0]])  # 4 m along, 8 m across
    lines = MapLines.from_kinds(
        np.concatenate([starts, crossing]), np.concatenate([ends, np.roll(crossing, -1, axis=0)]),
        ["road_edge"] * len(starts) + ["crosswalk"] * 4,
    )
    picture = render(camera, lines=lines, road=road_ahead())[FRONT].astype(int)
    x, y = pixel_of(camera, FRONT, [8.0, 4.0, 0.0])  # on the left edge line
    assert picture[y, x].min() > 200
    # Across the crossing, stripes and road alternate: white runs between grey ones.
    row = pixel_of(camera, FRONT, [22.0, 0.0, 0.0])[1]
    lo, hi = pixel_of(camera, FRONT, [22.0, 3.5, 0.0])[0], pixel_of(camera, FRONT, [22.0, -3.5, 0.0])[0]
    white = picture[row, lo:hi].min(axis=-1) > 200
    assert 4 <= np.count_nonzero(np.diff(white.astype(int)) == 1) <= 8  # 7 stripes in 7 m
    # Without the crossing, the same row is road only.
    bare = render(camera, road=road_ahead())[FRONT, row, lo:hi].astype(int)
    assert (bare.min(axis=-1) < 150).all()


def test_night_rain_and_fog_change_the_picture_as_a_driver_would_see_them(camera):
    scene = dict(boxes=boxes_of(car(15.0)), paints=[0], road=road_ahead())
    day = render(camera, **scene).astype(float)
    night = render(camera, weather=Weather(sun_altitude_angle=-20.0), **scene).astype(float)
    assert night.mean() < 0.3 * day.mean()
    width, height = camera.image_size
    wet = render(camera, weather=Weather(precipitation=90.0), **scene)[FRONT, height - 5, width // 2].astype(float)
    assert wet.mean() < 0.8 * day[FRONT, height - 5, width // 2].mean()  # wet asphalt is darker
    fog = render(camera, weather=Weather(fog_density=80.0), **scene).astype(float)
    # Far ground (just under the horizon) is close to the fog's grey, the near road much less so.
    far = pixel_of(camera, FRONT, [140.0, 0.0, 0.0])
    near = pixel_of(camera, FRONT, [6.0, 0.0, 0.0])
    assert np.ptp(fog[FRONT, far[1], far[0]]) < 15 and fog[FRONT, far[1], far[0]].mean() > 150
    assert abs(fog[FRONT, near[1], near[0]].mean() - day[FRONT, near[1], near[0]].mean()) < 60


def test_polygons_cover_the_pixel_centres_inside_them_as_opencv_tests_them():
    rng = np.random.default_rng(0)
    canvases = np.zeros((2, 60, 80, 3), dtype=np.uint8)
    polygons, views = [], []
    for i in range(40):
        centre, radius = rng.uniform([0, 0], [80, 60]), rng.uniform(2, 25)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 5))  # a convex pentagon
        polygons.append(centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1))
        views.append(i % 2)
    polygons = np.array(polygons)
    colours = np.array([[255, 255, 255]] * len(polygons), dtype=np.uint8)
    fill_polygons(canvases, np.array(views), np.arange(len(polygons)), polygons, colours)
    for view in range(2):
        inside = np.zeros((60, 80), dtype=bool)
        unsure = np.zeros((60, 80), dtype=bool)
        for poly in polygons[np.array(views) == view]:
            contour = poly.astype(np.float32).reshape(-1, 1, 2)
            for y in range(60):
                for x in range(80):
                    d = cv2.pointPolygonTest(contour, (float(x), float(y)), True)
                    inside[y, x] |= d > 1e-3
                    unsure[y, x] |= abs(d) <= 1e-3
        painted = canvases[view, ..., 0] == 255
        assert np.array_equal(painted[~unsure], inside[~unsure])


def test_overlapping_polygons_are_all_painted_the_higher_rank_on_top():
    canvases = np.zeros((1, 10, 10, 3), dtype=np.uint8)
    squares = np.array([[[1, 1], [6, 1], [6, 6], [1, 6]], [[3, 3], [8, 3], [8, 8], [3, 8]]], dtype=float)
    colours = np.array([[255, 0, 0], [0, 0, 255]], dtype=np.uint8)
    fill_polygons(canvases, np.zeros(2, dtype=int), np.array([1, 0]), squares, colours)
    assert (canvases[0, 4, 4] == [0, 0, 255]).all()  # the overlap: the first square's rank, 1, on top
    assert (canvases[0, 2, 2] == [0, 0, 255]).all() and (canvases[0, 7, 7] == [255, 0, 0]).all()
    assert (canvases[0, 0, 0] == 0).all()


def test_clipping_at_the_near_plane_keeps_the_part_in_front():
    square = np.array([[[-1.0, 0.0, -2.0], [1.0, 0.0, -2.0], [1.0, 0.0, 2.0], [-1.0, 0.0, 2.0]]])
    clipped, keep = clip_polygons_near(square, 0.5)
    assert keep.tolist() == [True]
    corners = np.unique(clipped[0].round(9), axis=0)
    assert (corners[:, 2] >= 0.5 - 1e-12).all()
    assert sorted(map(tuple, corners[:, [0, 2]])) == [(-1.0, 0.5), (-1.0, 2.0), (1.0, 0.5), (1.0, 2.0)]
    behind = square.copy()
    behind[..., 2] -= 10.0
    assert clip_polygons_near(behind, 0.5)[1].tolist() == [False]


def test_the_embedded_world_shows_its_scene_in_each_camera_the_same_for_the_same_seed():
    def pictures(seed: int, ticks: int = 3) -> list[dict]:
        world = EmbeddedWorld(map="merge", vehicles=12, seed=seed, attach_cameras=True, rig=RIG)
        ego = world.add_ego()
        world.set_autopilot(ego, True)
        out = []
        for _ in range(ticks):
            world.tick()
            out.append(world.observe(ego))
        return out

    a, b = pictures(3), pictures(3)
    names = [c["name"] for c in RIG.cameras]
    width, height = RIG.image_size
    for obs_a, obs_b in zip(a, b):
        assert list(obs_a.camera_images) == names
        assert all(im.shape == (height, width, 3) and im.dtype == np.uint8 for im in obs_a.camera_images.values())
        assert all(np.array_equal(obs_a.camera_images[n], obs_b.camera_images[n]) for n in names)
    # The pictures follow the scene: the ego moves, the picture changes.
    assert not np.array_equal(a[0].camera_images["CAM_FRONT"], a[-1].camera_images["CAM_FRONT"])
    with pytest.raises(ValueError, match="attach_cameras=true needs world.rig"):
        EmbeddedWorld(attach_cameras=True)


def test_a_vehicle_keeps_its_paint_from_frame_to_frame():
    world = EmbeddedWorld(map="highway", vehicles=10, seed=5, attach_cameras=True, rig=RIG)
    ego = world.add_ego()
    world.set_autopilot(ego, True)
    paints = {}
    for _ in range(5):
        world.tick()
        world.observe(ego)
        for v in world._road.vehicles:
            assert paints.setdefault(id(v), v.paint) == v.paint
    assert len({p % len(VEHICLE_PAINTS) for p in paints.values()}) > 3  # and vehicles differ


def test_side_by_side_puts_each_cameras_picture_under_its_generated_view():
    views = np.full((3, 20, 30, 3), 7, dtype=np.uint8)
    cameras = np.stack([np.full((40, 60, 3), 50 * (i + 1), dtype=np.uint8) for i in range(3)])
    strip = compose_strip(views, cameras=cameras)
    assert strip.shape == (40, 90, 3)
    assert (strip[:20] == 7).all()
    assert [int(strip[30, 30 * i + 15, 0]) for i in range(3)] == [50, 100, 150]
    with pytest.raises(ValueError, match="cameras must be"):
        compose_strip(views, cameras=cameras[:2])
