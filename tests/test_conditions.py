"""Conditions: rig poses, projection, layout pictures, camera scalars and captions."""

from __future__ import annotations

import math
import pathlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dwm.conditions.builder import ConditionBuilder
from dwm.conditions.packed import PackedConditions
from dwm.conditions.caption import caption, time_of_day, weather_words
from dwm.world.carla_pose import carla_transform_matrix, world_from_carla_vehicle
from dwm.world.rig import CAMERA_PARAM_NAMES
from dwm.geometry.projection import BOX_EDGES, box_corners, clip_segments, project_segments
from dwm.conditions.builder import resize_layouts
from dwm.world.rig import CameraRig
from dwm.world.base import Boxes, MapKind, MapLines, Observation, Weather

CONF = pathlib.Path(__file__).resolve().parents[1] / "conf"
ENV = "A multi-lane highway."
CAR = (4.6, 1.9, 1.6)
TRUCK = (9.0, 2.5, 3.6)

BLUE, YELLOW, GREEN, RED = (0, 0, 255), (255, 255, 0), (0, 255, 0), (255, 0, 0)


def rig_node(name: str):
    return OmegaConf.load(CONF / "rig" / f"{name}.yaml")


@pytest.fixture(scope="module")
def builder3() -> ConditionBuilder:
    pipeline = OmegaConf.load(CONF / "pipeline" / "default.yaml")
    world = OmegaConf.load(CONF / "world" / "embedded.yaml")
    cfg = OmegaConf.create({"rig": rig_node("nusc_3views"), "pipeline": pipeline, "world": {"dt": world.dt}})
    return ConditionBuilder.from_config(cfg)


@pytest.fixture(scope="module")
def builder6() -> ConditionBuilder:
    return ConditionBuilder(rig_node("nusc_6views"), resolution=(176, 304), fps=10.0)


def boxes(*items) -> Boxes:
    """items: (category, (x, y) of the box's ground centre in the ego frame, size)."""
    if not items:
        return Boxes.empty()
    cats = [c for c, _, _ in items]
    sizes = np.array([s for _, _, s in items], dtype=float)
    centers = np.array([[x, y, s[2] / 2] for _, (x, y), s in items], dtype=float)
    return Boxes.upright(centers, sizes, np.zeros(len(items)), cats)


def lines(*items) -> MapLines:
    """items: (kind, [(x, y), ...]) polylines on the ground, in the ego frame."""
    if not items:
        return MapLines.empty()
    starts, ends, kinds = [], [], []
    for kind, points in items:
        pts = np.array([[x, y, 0.0] for x, y in points])
        starts.append(pts[:-1])
        ends.append(pts[1:])
        kinds.append(np.full(len(pts) - 1, int(kind)))
    return MapLines(np.concatenate(starts), np.concatenate(ends), np.concatenate(kinds))


def straight(kind, y, x0, x1, step=1.0):
    return (kind, [(x, y) for x in np.arange(x0, x1 + 1e-9, step)])


def observe(box_list=None, line_list=None, weather=Weather(), ego_pose=None, sim_time=1.5) -> Observation:
    return Observation(
        ego_id="ego",
        sim_time=sim_time,
        ego_pose=np.eye(4) if ego_pose is None else ego_pose,
        ego_speed=0.0,
        boxes=box_list if box_list is not None else Boxes.empty(),
        map_lines=line_list if line_list is not None else MapLines.empty(),
        weather=weather,
        environment=ENV,
    )


def colour_mask(image: torch.Tensor, rgb) -> np.ndarray:
    """(H, W) bool: pixels of a (3, H, W) [0, 1] image that are clearly this colour (any
    brightness, since the resize blends lines with the black background)."""
    pixels = image.permute(1, 2, 0).numpy().astype(np.float64)
    target = np.asarray(rgb, dtype=np.float64) / 255.0
    norm = np.linalg.norm(pixels, axis=-1)
    cosine = pixels @ target / np.maximum(norm * np.linalg.norm(target), 1e-9)
    return (pixels.max(axis=-1) > 0.25) & (cosine > 0.98)


def view(builder: ConditionBuilder, name: str) -> int:
    return builder.rig.names.index(name)


# --- the rig -------------------------------------------------------------------------------


def axis_yaw_deg(ego_from_camera: np.ndarray) -> float:
    axis = ego_from_camera[:3, 2]  # the optical axis (camera +z) in the ego frame
    return math.degrees(math.atan2(axis[1], axis[0]))


def test_rig_optical_axes_point_where_the_cameras_look():
    rig = CameraRig.from_config(rig_node("nusc_6views"))
    poses = dict(zip(rig.names, rig.ego_from_camera))
    # Carla yaws are clockwise (left-handed): -55.161 deg there is 55.161 deg to the left here.
    assert axis_yaw_deg(poses["CAM_FRONT"]) == pytest.approx(0.5879, abs=0.05)
    assert axis_yaw_deg(poses["CAM_FRONT_LEFT"]) == pytest.approx(55.161, abs=0.05)
    assert axis_yaw_deg(poses["CAM_FRONT_RIGHT"]) == pytest.approx(-57.575, abs=0.05)
    assert abs(axis_yaw_deg(poses["CAM_BACK"])) == pytest.approx(179.861, abs=0.05)
    for name, pose in poses.items():
        rotation = pose[:3, :3]
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-9)
        assert np.linalg.det(rotation) == pytest.approx(1.0)
        assert pose[2, 1] < -0.99, f"{name}: image down must be the world's down"
        assert 1.45 < pose[2, 3] < 1.65, f"{name}: cameras sit about 1.5 m above the ground"
    # Positions: Carla's vehicle-centre x plus the 1.5 m to the rear axle; y mirrored.
    np.testing.assert_allclose(poses["CAM_FRONT"][:3, 3], [0.22201 + 1.5, -0.00475, 1.49491], atol=1e-9)
    np.testing.assert_allclose(poses["CAM_FRONT_LEFT"][:3, 3], [0.02388 + 1.5, 0.49463, 1.50933], atol=1e-9)
    for name in ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT"):
        assert 1.5 < poses[name][0, 3] < 1.75


def test_carla_matrix_follows_carla_angles():
    # Yaw 90 deg turns Carla's x (forward) onto its y (right); pitch 90 deg onto z (up).
    np.testing.assert_allclose(carla_transform_matrix([0, 0, 0], [0, 90, 0])[:3, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(carla_transform_matrix([0, 0, 0], [90, 0, 0])[:3, 0], [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(carla_transform_matrix([1, 2, 3], [10, 20, 30])[:3, 3], [1, 2, 3])


def test_carla_vehicle_pose_becomes_rear_axle_pose():
    # A vehicle centred at Carla (10, 5, 0) facing Carla's +y (yaw 90, to the right):
    # here it is at (10, -5, 0) facing -y, and its rear axle is 1.5 m behind, at y = -3.5.
    pose = world_from_carla_vehicle([10.0, 5.0, 0.0], [0.0, 90.0, 0.0])
    np.testing.assert_allclose(pose[:3, 3], [10.0, -3.5, 0.0], atol=1e-9)
    np.testing.assert_allclose(pose[:3, 0], [0.0, -1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(pose[:3, 2], [0.0, 0.0, 1.0], atol=1e-12)


def test_camera_params_hold_the_rig_values(builder3):
    frame = builder3.build(observe())
    params = frame.camera_params
    assert params.shape == (3, len(CAMERA_PARAM_NAMES)) == (3, 11) and params.dtype == torch.float32
    front = dict(zip(CAMERA_PARAM_NAMES, params[view(builder3, "CAM_FRONT")].tolist()))
    focal_over_h = (320.0 / math.tan(math.radians(65.105 / 2))) / 360.0
    assert front["fps"] == 10.0
    assert front["fx/H"] == pytest.approx(focal_over_h, rel=1e-6)
    assert front["fy/H"] == pytest.approx(focal_over_h, rel=1e-6)  # fy divided by H too
    assert front["cx/W"] == 0.5 and front["cy/H"] == 0.5
    assert front["r02"] == pytest.approx(1.0, abs=1e-3)  # optical axis along ego +x
    assert abs(front["r12"]) < 0.02 and abs(front["r22"]) < 0.02
    assert (front["tx"], front["ty"], front["tz"]) == pytest.approx((1.72201, -0.00475, 1.49491), abs=1e-5)
    left = dict(zip(CAMERA_PARAM_NAMES, params[view(builder3, "CAM_FRONT_LEFT")].tolist()))
    assert left["fx/H"] == pytest.approx((320.0 / math.tan(math.radians(64.294 / 2))) / 360.0, rel=1e-6)
    assert left["r12"] == pytest.approx(math.sin(math.radians(55.161)), abs=1e-3)
    assert builder3.build(observe(), fps=2.0).camera_params[:, 0].tolist() == [2.0, 2.0, 2.0]


def test_output_shapes_and_ranges(builder3):
    obs = observe(boxes(("car", (15.0, 0.0), CAR)), lines(straight(MapKind.LANE_LINE, 1.8, 3, 40)), sim_time=4.2)
    frame = builder3.build(obs)
    for images in (frame.box_images, frame.map_images):
        assert images.shape == (3, 3, 176, 304) and images.dtype == torch.float32
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert frame.layout.shape == (3, 6, 176, 304)
    assert frame.num_views == 3 and len(frame.captions) == 3 and frame.sim_time == 4.2


def test_packed_conditions_are_the_built_ones_bit_for_bit_and_small(builder3):
    obs = observe(boxes(("car", (15.0, 0.0), CAR)), lines(straight(MapKind.LANE_LINE, 1.8, 3, 40)), sim_time=4.2)
    pictures = {name: np.full((90, 160, 3), k * 60, np.uint8) for k, name in enumerate(builder3.rig.names)}
    obs = replace(obs, camera_images=pictures)
    frame, packed = builder3.build(obs, fps=5.0), builder3.build_packed(obs, fps=5.0)
    for again in (packed.unpack(), PackedConditions.pack(frame).unpack()):
        assert torch.equal(again.box_images, frame.box_images) and torch.equal(again.map_images, frame.map_images)
        assert torch.equal(again.camera_params, frame.camera_params) and again.camera_params[0, 0] == 5.0
        assert again.captions == frame.captions and again.sim_time == 4.2
        assert np.array_equal(again.camera_images, frame.camera_images)
        assert again.camera_images.shape == (3, 176, 304, 3)
    model_side = packed.without_cameras()
    assert model_side.camera_images is None and model_side.unpack().camera_images is None
    assert torch.equal(model_side.unpack().layout, frame.layout)
    # What waits in a queue for every frame in flight: a small part of the float32 images.
    assert model_side.nbytes * 20 < frame.layout.numel() * 4


# --- projection and drawing ----------------------------------------------------------------


def test_box_straight_ahead_is_centred_in_the_front_view_only(builder6):
    frame = builder6.build(observe(boxes(("car", (20.0, 0.0), CAR))))
    drawn = {name: int(colour_mask(frame.box_images[i], BLUE).sum()) for i, name in enumerate(builder6.rig.names)}
    assert drawn["CAM_FRONT"] > 50
    assert all(count == 0 for name, count in drawn.items() if name != "CAM_FRONT"), drawn
    cols = np.nonzero(colour_mask(frame.box_images[view(builder6, "CAM_FRONT")], BLUE))[1]
    assert abs(cols.mean() - 304 / 2) < 6  # centred horizontally
    assert "car" in frame.captions[view(builder6, "CAM_FRONT")]
    assert "car" not in frame.captions[view(builder6, "CAM_BACK")]


def test_lines_left_of_the_ego_project_left_of_centre(builder3):
    frame = builder3.build(observe(line_list=lines(straight(MapKind.LANE_LINE, 1.8, 3, 40))))
    cols = np.nonzero(colour_mask(frame.map_images[view(builder3, "CAM_FRONT")], GREEN))[1]
    assert len(cols) > 50 and cols.max() < 304 / 2
    frame = builder3.build(observe(line_list=lines(straight(MapKind.LANE_LINE, -1.8, 3, 40))))
    cols = np.nonzero(colour_mask(frame.map_images[view(builder3, "CAM_FRONT")], GREEN))[1]
    assert len(cols) > 50 and cols.min() > 304 / 2


def test_box_corners_and_heading_diagonals_follow_the_reference_order():
    upright = Boxes.upright(np.zeros((2, 3)), [[4.0, 2.0, 1.0]] * 2, [0.0, math.pi / 2], ["car", "car"])
    corners = box_corners(upright.centers, upright.sizes, upright.rotations)
    # Corner 6 is front-left-bottom, corner 1 back-right-top (bits x, y, z; +y is left).
    np.testing.assert_allclose(corners[0, 6], [2.0, 1.0, -0.5])
    np.testing.assert_allclose(corners[0, 1], [-2.0, -1.0, 0.5])
    np.testing.assert_allclose(corners[1, 6], [-1.0, 2.0, -0.5], atol=1e-12)  # facing +y
    edges = {tuple(sorted(e)) for e in BOX_EDGES.tolist()}
    assert len(BOX_EDGES) == 14 and {(3, 6), (5, 6)} <= edges
    box_edges = [(a, b) for a, b in BOX_EDGES.tolist() if (a, b) not in {(6, 3), (6, 5)}]
    lengths = sorted(np.linalg.norm(corners[0, a] - corners[0, b]) for a, b in box_edges)
    assert lengths == pytest.approx([1.0] * 4 + [2.0] * 4 + [4.0] * 4)


def test_clip_segments_moves_the_outside_end_along_the_segment():
    a = np.array([[0.0, 0.0, -1.0], [0.0, 0.0, 3.0], [1.0, 1.0, -2.0]])
    b = np.array([[2.0, 4.0, 3.0], [0.0, 0.0, 5.0], [1.0, 1.0, -1.0]])
    a2, b2, keep = clip_segments(a, b, (0.05,), (2.0,), axes=(2,))
    assert keep.tolist() == [True, False, False]  # the 2nd lies beyond 2, the 3rd behind
    np.testing.assert_allclose(a2[0], [0.525, 1.05, 0.05])  # t = 1.05 / 4 along a -> b
    np.testing.assert_allclose(b2[0], [1.5, 3.0, 2.0])  # t = 3 / 4


def test_segment_crossing_the_near_plane_keeps_its_visible_part(builder3):
    # A lane line from beside the rear axle (behind the front camera) to 30 m ahead.
    crossing = lines((MapKind.LANE_LINE, [(-2.0, 1.8), (30.0, 1.8)]))
    obs = observe(line_list=crossing)
    front = view(builder3, "CAM_FRONT")
    camera_from_world = np.linalg.inv(builder3.rig.ego_from_camera)
    views, index, p0, p1 = project_segments(
        camera_from_world, builder3.rig.intrinsics, crossing.starts, crossing.ends, 0.05, 65.0
    )
    assert front in views.tolist()
    i = views.tolist().index(front)
    far_end = camera_from_world[front] @ np.array([30.0, 1.8, 0.0, 1.0])
    expected = (builder3.rig.intrinsics[front] @ far_end[:3])[:2] / far_end[2]
    np.testing.assert_allclose(p1[i], expected)  # the visible end is untouched
    assert p0[i][0] < -1000 and p0[i][1] > 1000  # the near end runs far off the bottom left
    # Drawn, it runs from the bottom of the picture up to its far end.
    rows = np.nonzero(colour_mask(builder3.build(obs).map_images[front], GREEN))[0]
    assert rows.max() >= 172 and abs(rows.min() - expected[1] * 176 / 360) < 3


def test_colours_follow_the_table_in_the_right_image(builder3):
    obs = observe(
        boxes(("car", (14.0, 3.0), CAR), ("truck", (20.0, -3.5), TRUCK)),
        lines(
            straight(MapKind.LANE_LINE, 1.8, 3, 40),
            straight(MapKind.ROAD_EDGE, -1.8, 3, 40),
            (MapKind.CROSSWALK, [(10, 4), (13, 4), (13, -4), (10, -4), (10, 4)]),
        ),
    )
    frame = builder3.build(obs)
    front = view(builder3, "CAM_FRONT")
    box_image, map_image = frame.box_images[front], frame.map_images[front]
    car, truck = colour_mask(box_image, BLUE), colour_mask(box_image, YELLOW)
    assert car.sum() > 30 and np.nonzero(car)[1].mean() < 152  # the car is on the left
    assert truck.sum() > 30 and np.nonzero(truck)[1].mean() > 152  # the truck on the right
    lane, edge, crosswalk = (colour_mask(map_image, c) for c in (GREEN, BLUE, RED))
    assert lane.sum() > 30 and np.nonzero(lane)[1].mean() < 152
    assert edge.sum() > 30 and np.nonzero(edge)[1].mean() > 152
    assert crosswalk.sum() > 30
    # Drawn, the box image holds only box colours and the map image only map colours.
    layout = builder3.render(obs)
    box_colours = {tuple(c) for c in np.unique(layout.boxes[front].reshape(-1, 3), axis=0)}
    map_colours = {tuple(c) for c in np.unique(layout.maps[front].reshape(-1, 3), axis=0)}
    assert box_colours == {(0, 0, 0), BLUE, YELLOW}
    assert map_colours == {(0, 0, 0), GREEN, BLUE, RED}
    # Crosswalks are drawn over lane lines.
    over = builder3.render(
        observe(line_list=lines(straight(MapKind.LANE_LINE, 0.0, 5, 20), (MapKind.CROSSWALK, [(12, 3), (12, -3)])))
    )
    centre = over.maps[front][:, 300:340]
    assert (centre == RED).all(axis=-1).any() and not ((centre[..., 0] > 0) & (centre[..., 1] > 0)).any()


def test_other_categories_are_not_drawn(builder3):
    frame = builder3.build(observe(boxes(("traffic_cone", (10.0, 0.0), (0.5, 0.5, 0.8)))))
    assert float(frame.box_images.max()) == 0.0


def test_crosswalk_outline_is_closed(builder3):
    # A closed crosswalk outline on the road ahead: in the picture two horizontal edges
    # (near and far) joined by its left and right sides.
    outline = (MapKind.CROSSWALK, [(10, 4), (14, 4), (14, -4), (10, -4), (10, 4)])
    layout = builder3.render(observe(line_list=lines(outline)))
    red = (layout.maps[view(builder3, "CAM_FRONT")] == RED).all(axis=-1)  # native (360, 640)
    rows = np.nonzero(red.any(axis=1))[0]
    middle = red[(rows.min() + rows.max()) // 2]  # a row between the near and the far edge
    runs = np.flatnonzero(np.diff(np.r_[0, middle.astype(int), 0]) == 1)
    assert len(runs) == 2, "both sides of the crosswalk must be drawn"
    wide = red.sum(axis=1) > 100  # rows crossed by the near or the far edge
    assert wide[: (rows.min() + rows.max()) // 2].any() and wide[(rows.min() + rows.max()) // 2 :].any()


def test_map_lines_beyond_65_m_depth_are_not_drawn(builder3):
    front = view(builder3, "CAM_FRONT")
    cam_x = builder3.rig.ego_from_camera[front][0, 3]

    def drawn(segment) -> int:
        layout = builder3.render(observe(line_list=lines(segment)))
        return int(layout.maps[front].any(axis=-1).sum())

    assert drawn(straight(MapKind.LANE_LINE, 1.8, cam_x + 67, cam_x + 90)) == 0
    assert drawn(straight(MapKind.LANE_LINE, 1.8, cam_x + 50, cam_x + 60)) > 0
    # The limit is depth, not distance: 60 m ahead and 30 m aside is 67 m away, and drawn.
    assert drawn((MapKind.LANE_LINE, [(cam_x + 60, 30.0), (cam_x + 61, 30.0)])) > 0


def test_boxes_beyond_80_m_are_not_drawn(builder3):
    front = view(builder3, "CAM_FRONT")
    cam_x = builder3.rig.ego_from_camera[front][0, 3]

    def drawn(distance: float) -> int:
        frame = builder3.build(observe(boxes(("truck", (cam_x + distance, 0.0), TRUCK))))
        return int(colour_mask(frame.box_images[front], YELLOW).sum())

    assert drawn(78.0) > 0
    assert drawn(82.0) == 0


def test_resize_matches_pil_bilinear():
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    canvas = np.zeros((360, 640, 3), dtype=np.uint8)
    canvas[rng.integers(0, 360, 3000), rng.integers(0, 640, 3000)] = rng.integers(0, 256, (3000, 3))
    ours = resize_layouts(canvas[None], (176, 304))[0].permute(1, 2, 0).numpy() * 255.0
    pil = np.asarray(image_module.fromarray(canvas).resize((304, 176), image_module.BILINEAR), dtype=np.float64)
    assert np.abs(ours - pil).max() <= 1.0 + 1e-3


# --- captions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weather, time_word, weather_word",
    [
        (Weather(sun_altitude_angle=30), "daytime", "clear sky"),
        (Weather(sun_altitude_angle=5), "sunset", "clear sky"),
        (Weather(sun_altitude_angle=-5), "night", "clear sky"),
        (Weather(precipitation=50, fog_density=80, cloudiness=90), "daytime", "rainy"),
        (Weather(precipitation=30, fog_density=60, cloudiness=90), "daytime", "foggy"),
        (Weather(fog_density=50, cloudiness=80), "daytime", "overcast"),
        (Weather(cloudiness=50), "daytime", "cloudy"),
        (Weather(cloudiness=30), "daytime", "clear sky"),
    ],
)
def test_caption_time_and_weather_words(weather, time_word, weather_word):
    assert time_of_day(weather) == time_word and weather_words(weather) == weather_word
    assert caption(weather, ENV, ["roads", "car"]) == f"{time_word}. {weather_word}. {ENV} roads, car."


def test_captions_list_what_each_view_shows(builder3):
    obs = observe(
        boxes(
            ("truck", (75.0, 0.0), TRUCK),  # drawn, but too small to name
            ("van", (25.0, -3.5), CAR),
            ("pedestrian", (8.0, 1.0), (0.5, 0.5, 1.8)),
            ("car", (12.0, 3.5), CAR),
        ),
        lines(straight(MapKind.LANE_LINE, 1.8, 3, 40)),
        weather=Weather(sun_altitude_angle=-20, cloudiness=80),
    )
    captions = builder3.build(obs).captions
    # Nearest first, van and car both "car", named once.
    assert captions[view(builder3, "CAM_FRONT")] == f"night. overcast. {ENV} roads, pedestrian, car."
    assert captions[view(builder3, "CAM_FRONT_RIGHT")] == f"night. overcast. {ENV}"


# --- bad input -----------------------------------------------------------------------------


def test_bad_rig_and_observation_inputs_say_what_is_wrong(builder3):
    with pytest.raises(ValueError, match="cameras"):
        CameraRig.from_config({"image_size": [640, 360]})
    camera = {"name": "A", "fov": 60, "location": [0, 0, 1], "rotation": [0, 0, 0]}
    with pytest.raises(ValueError, match=r"rig.cameras\[0\].fov"):
        CameraRig.from_config({"image_size": [640, 360], "cameras": [{**camera, "fov": 200}]})
    with pytest.raises(ValueError, match=r"rig.cameras\[0\].rotation"):
        CameraRig.from_config({"image_size": [640, 360], "cameras": [{**camera, "rotation": [0, 0]}]})
    with pytest.raises(ValueError, match="appears twice"):
        CameraRig.from_config({"image_size": [640, 360], "cameras": [camera, camera]})
    with pytest.raises(ValueError, match="pipeline"):
        ConditionBuilder.from_config({"rig": rig_node("nusc_3views")})
    bad_kind = MapLines(np.zeros((1, 3)), np.ones((1, 3)), np.array([7]))
    with pytest.raises(ValueError, match=r"\[7\].*allowed: 0 \(LANE_LINE\)"):
        builder3.build(observe(line_list=bad_kind))
    bad_boxes = Boxes(np.zeros((2, 3)), np.ones((1, 3)), np.tile(np.eye(3), (2, 1, 1)), np.zeros((2, 3)), ["car", "car"])
    with pytest.raises(ValueError, match="sizes"):
        builder3.build(observe(bad_boxes))
