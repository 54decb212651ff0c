"""The world interface every backend (embedded highway-env, Carla) implements.

Frames and units: world frame right-handed, x forward, y left, z up, metres, radians.
The ego frame is the nuScenes one: origin on the ground under the rear axle, which sits
1.5 m behind the vehicle's centre (the reference's Carla convention), x forward.
"""

from __future__ import annotations

import dataclasses
import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

REAR_AXLE_BEHIND_CENTRE_M = 1.5

# Box categories the conditions know how to draw (reference colour table); anything else is
# skipped by the renderer, as in the reference.
BOX_CATEGORIES = ("car", "van", "truck", "bus", "motorcycle", "bicycle", "pedestrian")


class MapKind(enum.IntEnum):
    """Kinds of map line; the value is the code stored in `MapLines.kinds`."""

    LANE_LINE = 0
    ROAD_EDGE = 1
    CROSSWALK = 2


class UnknownEgoError(KeyError):
    """Raised for an ego id the world does not hold; the message lists the known ids."""

    def __init__(self, ego_id: str, known: list[str]):
        super().__init__(ego_id)
        self.ego_id = ego_id
        self.known = list(known)

    def __str__(self) -> str:
        known = ", ".join(self.known) if self.known else "none"
        return f"unknown ego {self.ego_id!r}; egos in this world: {known}"

    def __reduce__(self):  # crosses process boundaries (Ray) as itself, not as a bare KeyError
        return (type(self), (self.ego_id, self.known))


class WorldUnavailableError(RuntimeError):
    """The world's simulator cannot be reached (a Carla server that went away or never
    answered). The message is meant for the user: what happened, what is being done about it
    (reconnection attempts), and what to check. `retry_in` is None when no retry is planned,
    else the seconds until the next reconnection attempt."""

    def __init__(self, message: str, retry_in: float | None = None):
        super().__init__(message)
        self.retry_in = retry_in

    def __reduce__(self):  # crosses process boundaries (Ray) with its retry time
        return (type(self), (str(self), self.retry_in))


@dataclass
class VehicleControl:
    """Carla's `VehicleControl` semantics: sticky until changed.

    throttle [0, 1], steer [-1, 1] (negative is left, as in Carla), brake [0, 1].
    """

    throttle: float = 0.0
    steer: float = 0.0
    brake: float = 0.0
    reverse: bool = False
    hand_brake: bool = False

    RANGES = {"throttle": (0.0, 1.0), "steer": (-1.0, 1.0), "brake": (0.0, 1.0)}

    def __post_init__(self) -> None:
        for name, (lo, hi) in self.RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"control {name}={value!r} must be a number in [{lo}, {hi}]")
            if not (lo <= float(value) <= hi):  # also rejects NaN
                raise ValueError(f"control {name}={value!r} is outside the allowed range [{lo}, {hi}]")
            setattr(self, name, float(value))
        for name in ("reverse", "hand_brake"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"control {name}={getattr(self, name)!r} must be true or false")

    def merged(self, **changes) -> "VehicleControl":
        """A new control with some fields changed (the sticky-control update); validates."""
        allowed = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ValueError(f"unknown control field(s) {unknown}; allowed: {sorted(allowed)}")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Weather:
    """Carla's weather parameters that the caption reads (degrees and percent)."""

    sun_altitude_angle: float = 45.0  # deg above the horizon
    precipitation: float = 0.0  # 0..100
    fog_density: float = 0.0  # 0..100
    cloudiness: float = 10.0  # 0..100


@dataclass
class Boxes:
    """Oriented 3D boxes of the actors around an ego, in the world frame, in the world's actor
    order: the layout paints them in this order, later boxes over earlier ones, as the
    reference paints its actor list.

    centers (N, 3) m, box centre; sizes (N, 3) m, full length (box x), width (box y), height
    (box z); rotations (N, 3, 3) world <- box, whose columns are the box's forward, left and up
    axes (a car on a ramp is pitched, one on a banked road rolled); origins (N, 3) m, the
    actor's own origin (Carla's actor location; the ground point under the centre in the
    embedded world): the layout's 80 m range is measured from the camera to it, as in the
    reference; categories: N names, those of `BOX_CATEGORIES` are drawn.
    """

    centers: np.ndarray
    sizes: np.ndarray
    rotations: np.ndarray
    origins: np.ndarray
    categories: list[str]

    @staticmethod
    def upright(centers, sizes, yaws, categories, origins=None) -> "Boxes":
        """Boxes standing upright with headings `yaws` (N,) rad about +z; origins default to
        the ground point under each centre (centre minus half the height)."""
        centers = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
        sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 3)
        yaws = np.asarray(yaws, dtype=np.float64).reshape(-1)
        c, s = np.cos(yaws), np.sin(yaws)
        rotations = np.zeros((len(yaws), 3, 3))
        rotations[:, 0, 0], rotations[:, 0, 1] = c, -s
        rotations[:, 1, 0], rotations[:, 1, 1] = s, c
        rotations[:, 2, 2] = 1.0
        if origins is None:
            origins = centers - np.stack([np.zeros(len(sizes)), np.zeros(len(sizes)), sizes[:, 2] / 2], axis=-1)
        return Boxes(centers, sizes, rotations, np.asarray(origins, dtype=np.float64).reshape(-1, 3), list(categories))

    @staticmethod
    def empty() -> "Boxes":
        return Boxes(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3, 3)), np.zeros((0, 3)), [])

    @property
    def yaws(self) -> np.ndarray:
        """(N,) rad: the heading of each box's forward axis seen from above."""
        return np.arctan2(self.rotations[:, 1, 0], self.rotations[:, 0, 0])

    def take(self, rows) -> "Boxes":
        """The boxes at `rows` (indices or a boolean mask), in that order."""
        rows = np.arange(len(self))[rows]
        return Boxes(self.centers[rows], self.sizes[rows], self.rotations[rows], self.origins[rows],
                     [self.categories[r] for r in rows])

    def __len__(self) -> int:
        return len(self.categories)


@dataclass
class MapLines:
    """Map polylines as straight segments, in the world frame (m).

    starts (S, 3), ends (S, 3), kinds (S,) int codes of `MapKind`. Crosswalk outlines are
    closed polygons (their last segment returns to the first point), as in the training data.
    """

    starts: np.ndarray
    ends: np.ndarray
    kinds: np.ndarray

    @staticmethod
    def empty() -> "MapLines":
        return MapLines(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0,), dtype=np.int8))

    @staticmethod
    def from_kinds(starts, ends, kinds) -> "MapLines":
        """Segments starts -> ends (S, 3) m with kinds (S,) given by name ("lane_line",
        "road_edge", "crosswalk", any case), `MapKind` or integer code; a bad kind is a
        ValueError listing the allowed ones."""
        allowed = ", ".join(f"{k.name.lower()} ({int(k)})" for k in MapKind)
        codes = []
        for kind in kinds:
            try:
                if isinstance(kind, str):
                    codes.append(int(MapKind[kind.strip().upper()]))
                elif isinstance(kind, (int, np.integer)) and not isinstance(kind, bool):
                    codes.append(int(MapKind(int(kind))))
                else:
                    raise TypeError
            except (KeyError, ValueError, TypeError):
                raise ValueError(f"unknown map line kind {kind!r}; allowed: {allowed}") from None
        return MapLines(np.asarray(starts, dtype=np.float64).reshape(-1, 3),
                        np.asarray(ends, dtype=np.float64).reshape(-1, 3), np.asarray(codes, dtype=np.int8))

    def __len__(self) -> int:
        return len(self.kinds)


@dataclass
class Observation:
    """What one ego sees at one simulation time: everything the conditions need."""

    ego_id: str
    sim_time: float  # s since the world started
    ego_pose: np.ndarray  # (4, 4) world <- ego (rear axle, on the ground)
    ego_speed: float  # m/s, signed: negative when reversing
    boxes: Boxes  # other actors near the ego (the ego itself excluded)
    map_lines: MapLines  # map segments near the ego
    weather: Weather
    environment: str  # scene description used in captions
    control: VehicleControl = field(default_factory=VehicleControl)
    autopilot: bool = False
    # Real camera pictures from the simulator, when the world renders them (Carla with
    # attach_cameras): rig camera name -> (H, W, 3) uint8 RGB at the rig's native size.
    camera_images: dict[str, np.ndarray] | None = None
    # m from the centre line of the lane the ego is on, positive to its left (world frame);
    # None where the world cannot tell. |lane_offset| beyond half a lane: off its lane.
    lane_offset: float | None = None


class World(ABC):
    """A simulated world holding several ego cars, one per driving session."""

    dt: float  # s of simulation time per tick

    @abstractmethod
    def add_ego(self, ego_id: str | None = None) -> str:
        """Spawn an ego car; returns its id (generated when not given)."""

    @abstractmethod
    def remove_ego(self, ego_id: str) -> None:
        """Remove an ego car and everything the world keeps for it."""

    @abstractmethod
    def egos(self) -> list[str]:
        """Ids of the ego cars in the world."""

    @abstractmethod
    def apply_control(self, ego_id: str, control: VehicleControl) -> None:
        """Set the ego's sticky control (held until the next call)."""

    @abstractmethod
    def set_autopilot(self, ego_id: str, enabled: bool) -> None:
        """Hand the ego to the traffic model (True) or back to its controls (False)."""

    @abstractmethod
    def tick(self) -> float:
        """Advance the world by `dt`; returns the new simulation time (s)."""

    @abstractmethod
    def observe(self, ego_id: str) -> Observation:
        """The ego's current observation."""

    @property
    @abstractmethod
    def sim_time(self) -> float:
        """Simulation time (s)."""

    def close(self) -> None:
        """Release what the world holds (a server connection, spawned actors)."""
