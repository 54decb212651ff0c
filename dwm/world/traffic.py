"""Traffic cars of the embedded world: highway-env's IDM/MOBIL drivers, made to run for hours.

highway-env's traffic model is tuned for episodes of a few seconds. Over minutes on its merge,
roundabout and intersection it piles up: stopped cars drive backwards into the car behind,
cars merge blindly at the end of the on-ramp, and at junctions a lower-priority car that
already stands in the junction is run into. `TrafficCar` keeps highway-env's driver and adds
what a long-running scene needs (the junction controller is `dwm.world.traffic_road`):

- no reversing: a car that IDM wants slower than standing still stands still;
- besides IDM's leader on its own lane, a car also follows whatever is in the corridor straight
  ahead of it (a car merging in, one stopped in the junction, an ego driven across the lanes);
- a lane that ends (the on-ramp) is left as soon as the gap on the next lane is safe, and its
  end is a stop line until then;
- a leader found on the next road is as far as it really is (highway-env projects it on the
  current lane, which on the ring puts a car leaving by the exit a few metres ahead);
- it waits at the stop lines of `TrafficRoad`'s junction controller.

Everything here is in highway-env's screen frame (y down).
"""

from __future__ import annotations

import math

import numpy as np
from highway_env import utils
from highway_env.road.road import LaneIndex, Road
from highway_env.vehicle.behavior import IDMVehicle
from highway_env.vehicle.kinematics import Vehicle

from dwm.world.traffic_road import TrafficRoad

# Footprint and height per box category: length, width, height (m). The car is highway-env's
# own vehicle (5 x 2 m), so its traffic model keeps its tuned gaps; the truck is about the
# nuScenes mean truck, short enough to turn at highway-env's junctions.
CATEGORY_SIZES: dict[str, tuple[float, float, float]] = {
    "car": (5.0, 2.0, 1.7),
    "truck": (7.0, 2.5, 2.9),
}
_CAR_LENGTH = CATEGORY_SIZES["car"][0]


class TracksLanes:
    """Lane tracking for vehicles on a `TrafficRoad`: its own closest-lane rule, which keeps
    the current lane while the vehicle is still on it."""

    def on_state_update(self) -> None:
        if isinstance(self.road, TrafficRoad):
            target = getattr(self, "target_lane_index", None)
            self.lane_index = self.road.closest_lane_index(self.position, self.heading, self.lane_index, target)
            self.lane = self.road.network.get_lane(self.lane_index)
        else:
            super().on_state_update()


class TrafficCar(TracksLanes, IDMVehicle):
    """highway-env's IDM/MOBIL driver with a box category, that category's footprint and a
    cruise speed.

    keep_lane: no MOBIL lane changes (an ego on autopilot keeps its lane), except to leave a
    lane that ends.
    """

    CORRIDOR_TIME_S = 2.5  # look this far ahead (at the current speed) for anything in the way
    CORRIDOR_MIN_M = 12.0
    CORRIDOR_MARGIN_M = 0.3  # lateral clearance beyond the half widths
    LANE_END_GAP_M = 3.0  # a car waiting to leave a lane that ends stops this far before its end
    MERGE_TIME_GAP_S = 2.5  # time gap it needs behind it on the lane it merges into
    CHANGE_ANGLE_MAX = 0.1  # rad: on a map's own lanes, lane changes only when driving along the lane

    def __init__(
        self,
        road: Road,
        position: np.ndarray,
        heading: float = 0.0,
        speed: float = 0.0,
        category: str = "car",
        cruise_speed: float = 20.0,
        keep_lane: bool = False,
    ):
        length, width, _ = CATEGORY_SIZES[category]
        # Instance attributes shadow the class constants that highway-env reads through self;
        # set before the base constructor, which derives the collision diagonal from them.
        self.LENGTH, self.WIDTH = length, width
        if category == "truck":
            # IDM gaps are centre to centre: keep the car's bumper gap, accelerate like a truck.
            self.DISTANCE_WANTED = self.DISTANCE_WANTED + length - _CAR_LENGTH
            self.COMFORT_ACC_MAX = 1.5
        super().__init__(road, position, heading, speed, target_speed=cruise_speed)
        self.category = category
        self.cruise_speed = cruise_speed
        self.keep_lane = keep_lane

    def lane_distance_to(self, other, lane=None) -> float:
        """Signed distance (m) to `other` along our lane, as highway-env's IDM and MOBIL use it.

        For a vehicle on another road (found across a road's end) highway-env projects it on
        our lane, which on a curve (the ring) lands far too close; the straight-line distance
        is used then."""
        if other is not None and lane is None and other.lane_index[:2] != self.lane_index[:2]:
            straight = float(np.linalg.norm(other.position - self.position))
            return math.copysign(straight, self.front_distance_to(other))
        return super().lane_distance_to(other, lane)

    # -------------------------------------------------------------- longitudinal

    # highway-env's IDM/MOBIL step, steering and IDM acceleration, written with `math` on plain
    # floats: the same formulas without numpy's cost per scalar call (most of a tick with many
    # cars). numpy's and libm's asin/pow may differ in the last bit, so trajectories match
    # highway-env's own to rounding, not bit for bit (the same seed still gives the same run).

    def _idm_mobil(self) -> None:
        """highway-env's `IDMVehicle.act`: follow the road, MOBIL, steer, IDM on the lane (and
        on the target lane while changing)."""
        self.follow_road()
        if self.enable_lane_change:
            self.change_lane_policy()
        steering = self.steering_control(self.target_lane_index)
        steering = min(max(steering, -self.MAX_STEERING_ANGLE), self.MAX_STEERING_ANGLE)
        front, rear = self.road.neighbour_vehicles(self, self.lane_index)
        acceleration = self.acceleration(ego_vehicle=self, front_vehicle=front, rear_vehicle=rear)
        if self.lane_index != self.target_lane_index:
            front, rear = self.road.neighbour_vehicles(self, self.target_lane_index)
            acceleration = min(acceleration, self.acceleration(ego_vehicle=self, front_vehicle=front, rear_vehicle=rear))
        acceleration = min(max(acceleration, -self.ACC_MAX), self.ACC_MAX)
        Vehicle.act(self, {"steering": steering, "acceleration": acceleration})

    def steering_control(self, target_lane_index: LaneIndex) -> float:
        lane = self.road.network.get_lane(target_lane_index)
        s, lateral = lane.local_coordinates(self.position)
        future_heading = lane.heading_at(s + self.speed * self.TAU_PURSUIT)
        lateral_speed = -self.KP_LATERAL * lateral
        heading_command = math.asin(min(max(lateral_speed / utils.not_zero(self.speed), -1.0), 1.0))
        heading_ref = future_heading + min(max(heading_command, -math.pi / 4), math.pi / 4)
        heading_rate = self.KP_HEADING * utils.wrap_to_pi(heading_ref - self.heading)
        slip = math.asin(min(max(self.LENGTH / 2 / utils.not_zero(self.speed) * heading_rate, -1.0), 1.0))
        steering = math.atan(2 * math.tan(slip))
        return float(min(max(steering, -self.MAX_STEERING_ANGLE), self.MAX_STEERING_ANGLE))

    def acceleration(self, ego_vehicle, front_vehicle=None, rear_vehicle=None) -> float:
        if not ego_vehicle or not isinstance(ego_vehicle, Vehicle):
            return 0
        target = getattr(ego_vehicle, "target_speed", 0)
        if ego_vehicle.lane and ego_vehicle.lane.speed_limit is not None:
            target = min(max(target, 0), ego_vehicle.lane.speed_limit)
        acceleration = self.COMFORT_ACC_MAX * (
            1 - (max(ego_vehicle.speed, 0) / abs(utils.not_zero(target))) ** self.DELTA
        )
        if front_vehicle:
            d = ego_vehicle.lane_distance_to(front_vehicle)
            acceleration -= self.COMFORT_ACC_MAX * (self.desired_gap(ego_vehicle, front_vehicle) / utils.not_zero(d)) ** 2
        return acceleration

    def act(self, action: dict | str | None = None) -> None:
        if self.crashed:
            return
        self._idm_mobil()
        road = self.road
        if not isinstance(road, TrafficRoad):
            return
        acceleration = float(self.action["acceleration"])
        blocker = self._nearest_in_corridor(road)
        if blocker is not None:
            distance, leader = blocker
            along = float(np.dot(leader.velocity, self.direction))
            acceleration = min(acceleration, self._follow(distance, along, leader.LENGTH))
        if self.lane_index in road.ending_lanes and self.lane_index == self.target_lane_index:
            end = getattr(self.lane, "usable_length", self.lane.length)  # a lane may narrow away first
            to_end = end - self.lane.local_coordinates(self.position)[0]
            acceleration = min(acceleration, self._stop_at(to_end - self.LANE_END_GAP_M))
        acceleration = min(acceleration, self._curve_limit())
        to_line = road.stop_line_distance(self)
        if to_line is not None:
            acceleration = min(acceleration, self._stop_at(to_line))
        acceleration = max(acceleration, -self.ACC_MAX)
        # Stop at zero rather than let highway-env drive a stopped car backwards.
        acceleration = max(acceleration, min(-self.speed / road.dt, 0.0))
        self.action["acceleration"] = min(acceleration, self.ACC_MAX)

    LATERAL_ACC_MAX = 2.5  # m/s^2 in curves (a town's turns): speed at most sqrt(a / curvature)
    CURVE_LOOKAHEAD_M = 40.0

    def _curve_limit(self) -> float:
        """Acceleration (m/s^2) that brings the car down to each curve's speed before it reaches
        it, on the lane it follows and the next lane of its route (lanes that know their
        curves, `PolylineLane`; no limit otherwise)."""
        lane = self.road.network.get_lane(self.target_lane_index)
        if not hasattr(lane, "curves_ahead"):
            return math.inf
        s = lane.local_coordinates(self.position)[0]
        curves = lane.curves_ahead(s, self.CURVE_LOOKAHEAD_M)
        nxt = next((r for r in self.route or [] if r[0] == self.target_lane_index[1]), None)
        if nxt is not None:
            to_end = max(lane.length - s, 0.0)
            if to_end < self.CURVE_LOOKAHEAD_M:
                ahead = self.road.network.get_lane(nxt).curves_ahead(0.0, self.CURVE_LOOKAHEAD_M - to_end)
                curves += [(d + to_end, kappa) for d, kappa in ahead]
        v = max(self.speed, 0.0)
        limit = math.inf
        for distance, kappa in curves:
            v_curve_sq = self.LATERAL_ACC_MAX / kappa
            limit = min(limit, (v_curve_sq - v * v) / (2.0 * max(distance, 1.0)))
        return min(limit, self.COMFORT_ACC_MAX)

    def _follow(self, distance: float, leader_speed: float, leader_length: float) -> float:
        """IDM acceleration (m/s^2) behind a leader `distance` m ahead, centre to centre (as
        highway-env measures), moving at `leader_speed` m/s along our heading."""
        v = max(self.speed, 0.0)
        free = 1.0 - (v / utils.not_zero(max(self.target_speed, 0.0))) ** self.DELTA
        ab = -self.COMFORT_ACC_MAX * self.COMFORT_ACC_MIN
        gap = (
            self.DISTANCE_WANTED
            + (leader_length - _CAR_LENGTH) / 2
            + v * self.TIME_WANTED
            + v * (v - leader_speed) / (2.0 * math.sqrt(ab))
        )
        return self.COMFORT_ACC_MAX * (free - (gap / utils.not_zero(distance)) ** 2)

    def _stop_at(self, distance: float) -> float:
        """IDM acceleration to stop with the front bumper about at `distance` m ahead."""
        return self._follow(distance + self.DISTANCE_WANTED - self.LENGTH / 2, 0.0, _CAR_LENGTH)

    def _nearest_in_corridor(self, road: TrafficRoad) -> tuple[float, Vehicle] | None:
        """(distance ahead in m, vehicle) of the nearest vehicle in the lane-wide corridor
        straight ahead, or None."""
        st = road.state
        if getattr(st, "corridors", None) is None:
            st.corridors = self._corridors(st)
        rows, lon_all, lat_all, reach_all, in_way_all = st.corridors
        row = rows[id(self)]
        lon, lat, reach = lon_all[row], lat_all[row], reach_all[row]
        in_way = in_way_all[row].copy()
        # A car changing into this lane ahead is in the way before it is across.
        merging = st.merging_into.get(self.lane_index, [])
        if merging:
            two_lanes = 2.0 * self.lane.width_at(0.0)
            near = (lon[merging] > 0.0) & (lon[merging] < reach) & (np.abs(lat[merging]) < two_lanes)
            in_way[np.asarray(merging)[near]] = True
        if not in_way.any():
            return None
        k = np.flatnonzero(in_way)[np.argmin(lon[in_way])]
        return float(lon[k]), road.vehicles[k]

    @classmethod
    def _corridors(cls, st) -> tuple:
        """Every vehicle's corridor at once, from where everyone is before anyone acts (the
        road's `state`): (row of each vehicle by id, lon (N, N) m ahead of vehicle i to j along
        i's heading, lat (N, N) m across, reach (N,) m of i's corridor, in_way (N, N))."""
        vehicles = st.vehicles
        rel = st.positions[None, :, :] - st.positions[:, None, :]  # (N, N, 2): j relative to i
        d = st.directions  # (N, 2)
        lon = rel[..., 0] * d[:, 0:1] + rel[..., 1] * d[:, 1:2]
        lat = rel[..., 1] * d[:, 0:1] - rel[..., 0] * d[:, 1:2]
        speeds = np.array([v.speed for v in vehicles], dtype=np.float64)
        lengths = np.array([v.LENGTH for v in vehicles], dtype=np.float64)
        reach = np.maximum(cls.CORRIDOR_MIN_M, speeds * cls.CORRIDOR_TIME_S) + lengths
        # How far vehicle j reaches sideways seen along i's heading: its whole footprint, so
        # that a car standing across two lanes (a lane change stopped halfway) is in the way.
        cos = d @ d.T
        sin = d[:, 0:1] * d[None, :, 1] - d[:, 1:2] * d[None, :, 0]
        reach_across = np.abs(sin) * lengths[None, :] / 2 + np.abs(cos) * st.widths[None, :] / 2
        beside = np.abs(lat) < st.widths[:, None] / 2 + reach_across + cls.CORRIDOR_MARGIN_M
        in_way = (lon > 0.0) & (lon < reach[:, None]) & beside
        # Oncoming traffic keeps to its own lane; a car still turning out of a junction would
        # otherwise wait for the cars on the opposite lane. A car held at its stop line is not
        # in the way of the junction's traffic, whatever a straight corridor along a curve says.
        in_way &= (cos > -0.5) & ~np.eye(len(vehicles), dtype=bool) & ~st.held[None, :]
        rows = {id(v): i for i, v in enumerate(vehicles)}
        return rows, lon, lat, reach, in_way

    # -------------------------------------------------------------- lateral

    def follow_road(self) -> None:
        # highway-env moves a car at the end of its lane on to the closest lane of the next
        # road; for a lane that ends that is a blind merge. It waits for MOBIL's gap instead.
        if self.lane_index in self.road.ending_lanes and self.target_lane_index == self.lane_index:
            return
        super().follow_road()

    def change_lane_policy(self) -> None:
        ending = self.lane_index in self.road.ending_lanes
        if self.keep_lane and not ending:
            return
        if ending and self.target_lane_index != self.lane_index:
            # Still on the lane that ends: give the merge up while the gap closes, unless the
            # lane is already too narrow to go back to (the cars behind make room then).
            usable = getattr(self.lane, "usable_length", self.lane.length)
            committed = self.lane.local_coordinates(self.position)[0] > usable - self.LENGTH / 2
            if not committed and not self.mobil(self.target_lane_index):
                self.target_lane_index = self.lane_index
            return
        super().change_lane_policy()
        # MOBIL never changes lanes below 1 m/s: a car stopped at the end of its lane would
        # wait there for ever.
        if ending and abs(self.speed) < 1.0 and self.lane_index == self.target_lane_index:
            for side in self.road.network.side_lanes(self.lane_index):
                if self.road.network.get_lane(side).is_reachable_from(self.position) and self.mobil(side):
                    self.target_lane_index = side
                    break

    def mobil(self, lane_index: LaneIndex) -> bool:
        allowed = getattr(self.road.network, "lane_change_allowed", None)  # a map's markings
        if allowed is not None:
            # Out of a lane that ends a car merges whatever the line says: there is no other way on.
            if self.lane_index not in self.road.ending_lanes and not allowed(self.lane_index, lane_index, self.position):
                return False
            if lane_index in self.road.ending_lanes:
                return False  # never into a lane that ends or narrows away
            if abs(self.lane.local_angle(self.heading, self.lane.local_coordinates(self.position)[0])) > self.CHANGE_ANGLE_MAX:
                return False  # still turning (just out of a junction): no lane change across the turn
        if isinstance(self.road, TrafficRoad) and self.road.near_stop_line(lane_index, self.position, self.speed):
            return False  # too late to change in front of a junction: the controller must see it wait
        if self.lane_index not in self.road.ending_lanes:
            return super().mobil(lane_index)
        # Leaving a lane that ends: any gap will do that is safe for both, with room for a slow
        # car to get across before the car behind arrives.
        preceding, following = self.road.neighbour_vehicles(self, lane_index)
        limit = -self.LANE_CHANGE_MAX_BRAKING_IMPOSED
        if following is not None:
            room = self.lane_distance_to(following) * -1 - (self.LENGTH + following.LENGTH) / 2
            if room < max(1.0, self.MERGE_TIME_GAP_S * following.speed):
                return False
        return self.acceleration(following, self) >= limit and self.acceleration(self, preceding) >= limit
