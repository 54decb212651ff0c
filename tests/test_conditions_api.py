"""The public conditions API and the reference's drawing rules: painting order (map kinds and
actors), full box rotation, the 80 m range to the actor's origin, rigs from K or fov."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
from omegaconf import OmegaConf

from dwm.conditions import Boxes, CameraRig, ConditionBuilder, Layout, MapKind, MapLines
from dwm.conditions.colours import BOX_COLOURS, MAP_COLOURS
from dwm.geometry.projection import box_corners

CONF = pathlib.Path(__file__).resolve().parents[1] / "conf"
BLUE, YELLOW, GREEN, RED = (0, 0, 255), (255, 255, 0), (0, 255, 0), (255, 0, 0)


@pytest.fixture(scope="module")
def rig3() -> CameraRig:
    return CameraRig.from_config(OmegaConf.load(CONF / "rig" / "nusc_3views.yaml"))


@pytest.fixture(scope="module")
def builder(rig3) -> ConditionBuilder:
    return ConditionBuilder(rig3, resolution=(176, 304), fps=10.0)


def front(builder: ConditionBuilder) -> int:
    return builder.rig.names.index("CAM_FRONT")


def native(builder: ConditionBuilder, boxes: Boxes | None = None, lines: MapLines | None = None):
    """The native (V, H, W, 3) box and map canvases of a scene given in the ego frame."""
    canvases, _ = builder._render(np.eye(4), boxes or Boxes.empty(), lines or MapLines.empty())
    return canvases[0], canvases[1]


def is_colour(image: np.ndarray, rgb) -> np.ndarray:
    return (image == np.asarray(rgb, dtype=np.uint8)).all(axis=-1)


# --- painting order ------------------------------------------------------------------------


def test_map_paints_road_edges_then_lane_lines_then_crosswalks(builder):
    assert list(MAP_COLOURS) == [MapKind.ROAD_EDGE, MapKind.LANE_LINE, MapKind.CROSSWALK]
    f = front(builder)
    edge = ([0.0, 0.0, 0.0], [40.0, 0.0, 0.0], "road_edge")  # along the road
    lane = ([15.0, -3.0, 0.0], [15.0, 3.0, 0.0], "lane_line")  # across it, 15 m ahead
    walk = ([15.0, -3.0, 0.0], [15.0, 3.0, 0.0], "crosswalk")  # on the lane line

    def picture(*items):
        _, maps = native(builder, lines=MapLines.from_kinds(*(list(column) for column in zip(*items))))
        return maps[f]

    crossing = picture(edge).any(axis=-1) & picture(lane).any(axis=-1)  # pixels both lines cover
    assert crossing.sum() >= 4
    # Lane green lies on curb blue where they cross, whichever comes first in the list.
    for items in ([edge, lane], [lane, edge]):
        assert is_colour(picture(*items)[crossing], GREEN).all()
    # And crosswalk red over both.
    for items in ([walk, lane, edge], [edge, lane, walk]):
        image = picture(*items)
        assert is_colour(image[crossing], RED).all() and not is_colour(image, GREEN).any()


def two_overlapping(first: str, second: str) -> Boxes:
    """A truck-sized and a person-sized box at the same place 12 m ahead, in list order."""
    sizes = {"truck": (9.0, 2.5, 3.6), "pedestrian": (0.6, 0.6, 1.8), "car": (4.6, 1.9, 1.6)}
    return Boxes.upright(
        [[12.0, 0.0, sizes[first][2] / 2], [12.0, 0.0, sizes[second][2] / 2]],
        [sizes[first], sizes[second]],
        [0.0, math.pi / 2],
        [first, second],
    )


def test_boxes_are_painted_in_the_worlds_actor_order(builder):
    f = front(builder)
    boxes_a, _ = native(builder, two_overlapping("truck", "pedestrian"))
    boxes_b, _ = native(builder, two_overlapping("pedestrian", "truck"))
    red_a, yellow_a = is_colour(boxes_a[f], RED), is_colour(boxes_a[f], YELLOW)
    red_b, yellow_b = is_colour(boxes_b[f], RED), is_colour(boxes_b[f], YELLOW)
    both = (red_a | yellow_a) & (red_b | yellow_b)
    overlap = both & ((red_a & yellow_b) | (yellow_a & red_b))
    assert overlap.sum() > 5, "the two boxes must share pixels"
    # Where they overlap, the later actor's colour is on top: pedestrian red in a, truck in b.
    assert red_a[overlap].all() and yellow_b[overlap].all()


# --- boxes: rotation and range ---------------------------------------------------------------


def test_box_corners_keep_pitch_and_roll():
    pitched = np.array([[math.cos(0.2), 0.0, -math.sin(0.2)], [0.0, 1.0, 0.0], [math.sin(0.2), 0.0, math.cos(0.2)]])
    corners = box_corners(np.zeros((1, 3)), np.array([[4.0, 2.0, 1.0]]), pitched[None])[0]
    # Forward axis (cos 0.2, 0, sin 0.2), nose up: the front corners (x bit set, 4..7) sit
    # higher than the back ones by length * sin(0.2).
    front_z = corners[4:, 2].mean()
    back_z = corners[:4, 2].mean()
    assert front_z - back_z == pytest.approx(4.0 * math.sin(0.2))


def test_carla_boxes_equal_carla_world_vertices_on_a_ramp():
    carla = pytest.importorskip("carla")
    from dwm.world.carla_actors import carla_boxes
    from dwm.world.carla_pose import from_carla_points

    # A car pitched up a 12-degree ramp and rolled 4 degrees, yawed 30 degrees.
    transform = carla.Transform(carla.Location(10.0, -4.0, 2.0), carla.Rotation(pitch=12.0, yaw=30.0, roll=4.0))
    bbox = carla.BoundingBox(carla.Location(0.1, 0.0, 0.75), carla.Vector3D(2.4, 1.0, 0.75))
    boxes = carla_boxes(
        np.array([[10.0, -4.0, 2.0]]), np.array([[12.0, 30.0, 4.0]]), np.array([[0.1, 0.0, 0.75]]),
        np.array([[2.4, 1.0, 0.75]]), np.zeros((1, 3)), ["car"],
    )
    ours = box_corners(boxes.centers, boxes.sizes, boxes.rotations)[0]  # (8, 3), our frame
    theirs = from_carla_points([(v.x, v.y, v.z) for v in bbox.get_world_vertices(transform)])
    # Same 8 points (Carla numbers its vertices its own way).
    distances = np.linalg.norm(ours[:, None] - theirs[None], axis=-1)
    assert distances.min(axis=1).max() < 1e-4 and distances.min(axis=0).max() < 1e-4
    np.testing.assert_allclose(boxes.origins[0], [10.0, 4.0, 2.0])  # y flips into our frame
    assert boxes.yaws[0] == pytest.approx(-math.radians(30.0), abs=1e-9)


def test_boxes_from_carla_actors_keep_the_actor_order_and_skip_the_rest():
    carla = pytest.importorskip("carla")
    from dwm.world.carla_actors import boxes_from_carla_actors

    class Actor:  # the fields of carla.Actor that boxing reads
        def __init__(self, type_id, attributes, location):
            self.type_id, self.attributes = type_id, attributes
            self.bounding_box = carla.BoundingBox(carla.Location(0, 0, 0.8), carla.Vector3D(2.0, 0.9, 0.8))
            self._transform = carla.Transform(location, carla.Rotation(yaw=90.0))

        def get_transform(self):
            return self._transform

    actors = [
        Actor("walker.pedestrian.0001", {}, carla.Location(5, 0, 0)),
        Actor("sensor.camera.rgb", {}, carla.Location(0, 0, 0)),
        Actor("vehicle.carlamotors.carlacola", {"base_type": "truck"}, carla.Location(20, 0, 0)),
        Actor("vehicle.yamaha.yzf", {"number_of_wheels": "2"}, carla.Location(30, 0, 0)),
    ]
    boxes = boxes_from_carla_actors(actors)
    assert boxes.categories == ["pedestrian", "truck", "motorcycle"]
    np.testing.assert_allclose(boxes.origins[:, 0], [5.0, 20.0, 30.0])


def test_range_is_measured_to_the_actors_origin(builder):
    f = front(builder)
    cam = builder.rig.ego_from_camera[f][:3, 3]

    def drawn(origin_distance: float, centre_distance: float) -> bool:
        """A box 1.8 m tall whose centre and origin lie at these distances ahead of the camera."""
        x_centre, x_origin = cam[0] + centre_distance, cam[0] + origin_distance
        boxes = Boxes(
            centers=np.array([[x_centre, 0.0, cam[2]]]), sizes=np.array([[4.0, 2.0, 1.8]]),
            rotations=np.eye(3)[None], origins=np.array([[x_origin, 0.0, cam[2]]]), categories=["car"],
        )
        box_images, _ = native(builder, boxes)
        return bool(box_images[f].any())

    assert drawn(79.0, 81.0)  # origin inside 80 m: drawn although the centre is beyond
    assert not drawn(81.0, 79.0)  # origin beyond 80 m: left out although the centre is inside


def test_upright_boxes_stand_on_their_origin():
    boxes = Boxes.upright([[3.0, 1.0, 0.8]], [[4.0, 2.0, 1.6]], [0.5], ["car"])
    np.testing.assert_allclose(boxes.origins, [[3.0, 1.0, 0.0]])
    assert boxes.yaws[0] == pytest.approx(0.5)
    np.testing.assert_allclose(boxes.rotations[0] @ boxes.rotations[0].T, np.eye(3), atol=1e-12)


# --- rigs and drawing without a world --------------------------------------------------------


def test_rig_from_fovs_and_from_intrinsics_agree_with_the_config_rig(rig3):
    by_fov = CameraRig.from_fovs(rig3.fovs, rig3.ego_from_camera, rig3.image_size, rig3.names)
    np.testing.assert_allclose(by_fov.intrinsics, rig3.intrinsics)
    by_k = CameraRig.from_intrinsics(rig3.intrinsics, rig3.ego_from_camera, rig3.image_size, rig3.names)
    np.testing.assert_allclose(by_k.fovs, rig3.fovs)
    np.testing.assert_allclose(by_k.camera_params(10.0), rig3.camera_params(10.0))


def test_off_centre_principal_point_moves_the_picture_and_the_scalars():
    # One forward camera 1.5 m up, nuScenes-like K at 1600x900 with cx moved 100 px right.
    pose = np.eye(4)
    pose[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]  # ego <- OpenCV: z forward, x right, y down
    pose[:3, 3] = [1.5, 0.0, 1.5]
    k = np.array([[1266.0, 0.0, 800.0], [0.0, 1266.0, 450.0], [0.0, 0.0, 1.0]])
    shifted = k.copy()
    shifted[0, 2] = 900.0
    lane = MapLines.from_kinds([[5.0, 0.0, 0.0]], [[40.0, 0.0, 0.0]], [MapKind.LANE_LINE])
    columns = []
    for K in (k, shifted):
        rig = CameraRig.from_intrinsics(K[None], pose[None], (1600, 900))
        layout = ConditionBuilder(rig, resolution=(180, 320), pen_width=8).draw(Boxes.empty(), lane)
        assert isinstance(layout, Layout) and layout.map_images.shape == (1, 3, 180, 320)
        green = layout.map_images[0, 1].numpy() > 0.5
        columns.append(np.nonzero(green)[1].mean())
        assert layout.camera_params[0, 3] == pytest.approx(K[0, 2] / 1600)  # cx / W
    # The line ahead is drawn at the principal point's column: 100 px of 1600 = 20 of 320 right.
    assert columns[0] == pytest.approx(160, abs=1.5)
    assert columns[1] - columns[0] == pytest.approx(20, abs=1.5)


def test_draw_takes_boxes_and_lines_at_any_resolution(rig3):
    boxes = Boxes.upright([[14.0, 0.0, 0.8]], [[4.6, 1.9, 1.6]], [0.0], ["car"])
    lines = MapLines.from_kinds([[3.0, 1.8, 0.0]], [[40.0, 1.8, 0.0]], ["LANE_LINE"])
    small = ConditionBuilder(rig3, resolution=(88, 152)).draw(boxes, lines)
    big = ConditionBuilder(rig3, resolution=(352, 608)).draw(boxes, lines)
    assert small.box_images.shape == (3, 3, 88, 152) and big.map_images.shape == (3, 3, 352, 608)
    assert small.objects[1] == ["roads", "car"]
    # The same scene seen from an ego 10 m further back: the car is smaller.
    back = np.eye(4)
    back[0, 3] = -10.0
    far = ConditionBuilder(rig3, resolution=(176, 304)).draw(boxes, lines, ego_pose=back)
    near = ConditionBuilder(rig3, resolution=(176, 304)).draw(boxes, lines)
    assert (far.box_images[1] > 0.3).sum() < (near.box_images[1] > 0.3).sum()
    # A rig drawn at another native size scales K, so the picture is the same shape.
    half = CameraRig.resized(rig3, (320, 180))
    np.testing.assert_allclose(half.intrinsics[:, 0, 0], rig3.intrinsics[:, 0, 0] / 2)
    np.testing.assert_allclose(half.camera_params(10.0), rig3.camera_params(10.0), rtol=1e-6)


def test_public_inputs_say_what_is_wrong(rig3):
    with pytest.raises(ValueError, match=r"unknown map line kind 'kerb'; allowed: lane_line \(0\), road_edge \(1\)"):
        MapLines.from_kinds([[0, 0, 0]], [[1, 0, 0]], ["kerb"])
    with pytest.raises(ValueError, match="unknown map line kind 9"):
        MapLines.from_kinds([[0, 0, 0]], [[1, 0, 0]], [9])
    with pytest.raises(ValueError, match=r"intrinsics \(V, 3, 3\)"):
        CameraRig.from_intrinsics(np.eye(3), np.eye(4)[None], (640, 360))
    with pytest.raises(ValueError, match="rigid"):
        CameraRig.from_intrinsics(rig3.intrinsics[:1], 2 * np.eye(4)[None], (640, 360))
    with pytest.raises(ValueError, match="pen_width"):
        ConditionBuilder(rig3, pen_width=0)
    with pytest.raises(ValueError, match="rotations"):
        ConditionBuilder(rig3).draw(Boxes(np.zeros((1, 3)), np.ones((1, 3)), np.eye(3), np.zeros((1, 3)), ["car"]),
                                    MapLines.empty())


def test_box_colour_table_is_the_reference_one():
    assert BOX_COLOURS == {
        "pedestrian": (255, 0, 0), "bicycle": (128, 255, 0), "motorcycle": (0, 255, 128), "bus": (128, 0, 255),
        "car": (0, 0, 255), "van": (0, 0, 255), "truck": (255, 255, 0),
    }


def test_readme_example_runs():
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Drawing layouts of your own scenes", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    layout = scope["layout"]
    assert layout.box_images.shape == (1, 3, 176, 304) and layout.camera_params.shape == (1, 11)
    assert float(layout.box_images[0, 2].max()) > 0.5  # the car, blue
    assert float(layout.map_images[0, 1].max()) > 0.5 and float(layout.map_images[0, 2].max()) > 0.5
