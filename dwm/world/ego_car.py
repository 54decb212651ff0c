"""The ego car of the embedded world: a Carla-style `VehicleControl` on highway-env's kinematic
bicycle model.

Throttle, brake, reverse and hand brake become a longitudinal acceleration; steer becomes a
front-wheel angle, turned at a limited rate and limited by tyre grip at speed.

Everything here is in highway-env's screen frame (y down: a positive wheel angle or heading
change turns right). Carla's steer is negative to the left, so a positive steer is a positive
wheel angle here; `dwm.world.maps.to_world_yaw` lifts headings to the world frame.
"""

from __future__ import annotations

import math

import numpy as np
from highway_env.road.road import Road
from highway_env.vehicle.kinematics import Vehicle

from dwm.world.base import VehicleControl
from dwm.world.traffic import CATEGORY_SIZES, TracksLanes

# Longitudinal model of the ego (m/s^2 unless noted).
THROTTLE_ACC = 3.5  # full throttle
BRAKE_DEC = 8.0  # full brake
HAND_BRAKE_DEC = 5.0  # holds the car against full throttle
ROLLING_DEC = 0.1
AERO_DEC_PER_V2 = 5e-4  # 1/m: drag deceleration per (m/s)^2, 0.45 m/s^2 at 30 m/s
MAX_SPEED = 40.0  # m/s forward
MAX_REVERSE_SPEED = 8.0  # m/s backwards

# Lateral model of the ego.
MAX_WHEEL_ANGLE = math.radians(35.0)  # at steer = +-1
WHEEL_RATE = 1.5  # rad/s: how fast the front wheels turn (full lock in about 0.4 s)
MAX_LATERAL_ACC = 8.0  # m/s^2 of tyre grip: at speed, full steer turns no tighter than this


def _resistance(speed: float, control: VehicleControl) -> float:
    """Deceleration (m/s^2, >= 0) that acts against the motion: brakes and drag."""
    dec = control.brake * BRAKE_DEC + ROLLING_DEC + AERO_DEC_PER_V2 * speed * speed
    return dec + (HAND_BRAKE_DEC if control.hand_brake else 0.0)


def speed_after(speed: float, control: VehicleControl, dt: float) -> float:
    """Signed speed (m/s) after `dt` s under `control`: throttle pushes along the gear
    (backwards in reverse, ignored under the hand brake), brakes and drag slow the car down to
    a stop but never push it the other way."""
    drive = 0.0 if control.hand_brake else control.throttle * THROTTLE_ACC
    pushed = speed + (-drive if control.reverse else drive) * dt
    slowed = max(0.0, abs(pushed) - _resistance(speed, control) * dt)
    return math.copysign(slowed, pushed)


def control_from_motion(acceleration: float, wheel_angle: float, speed: float) -> VehicleControl:
    """The forward-gear control that reproduces an acceleration (m/s^2) and a wheel angle (rad,
    highway-env frame) at a speed: what an autopilot leaves on the pedals and the wheel."""
    need = acceleration + _resistance(speed, VehicleControl())
    throttle = min(max(need / THROTTLE_ACC, 0.0), 1.0)
    brake = min(max(-need / BRAKE_DEC, 0.0), 1.0)
    steer = min(max(wheel_angle / MAX_WHEEL_ANGLE, -1.0), 1.0)
    return VehicleControl(throttle=throttle, steer=steer, brake=brake)


def _grip_limited_wheel_angle(length: float, speed: float) -> float:
    """Largest wheel angle (rad) whose turn stays within the tyre grip at this speed.

    highway-env's bicycle model turns at yaw rate v sin(beta) / (L/2) with slip angle
    beta = atan(tan(delta) / 2); the lateral acceleration is v * yaw rate.
    """
    if speed == 0.0:
        return MAX_WHEEL_ANGLE
    sin_beta = MAX_LATERAL_ACC * (length / 2) / (speed * speed)
    if sin_beta >= 1.0:
        return MAX_WHEEL_ANGLE
    return min(MAX_WHEEL_ANGLE, math.atan(2.0 * math.tan(math.asin(sin_beta))))


class EgoCar(TracksLanes, Vehicle):
    """A car driven by a sticky `VehicleControl`.

    A crashed car is brought to a stop by highway-env and ignores its controls until the world
    releases it.
    """

    category = "car"
    LENGTH, WIDTH = CATEGORY_SIZES["car"][:2]
    MAX_SPEED = MAX_SPEED
    MIN_SPEED = -MAX_REVERSE_SPEED

    def __init__(
        self,
        road: Road,
        position: np.ndarray,
        heading: float,
        speed: float,
        dt: float,
        control: VehicleControl | None = None,
        wheel_angle: float = 0.0,
    ):
        super().__init__(road, position, heading, speed)
        self.dt = dt  # the world's step: the pedals never flip the direction within one step
        self.control = control or VehicleControl()
        self.action = {"steering": wheel_angle, "acceleration": 0.0}

    def act(self, action: dict | str | None = None) -> None:
        """Turn the held control into this step's acceleration and wheel angle."""
        if self.crashed:
            return  # highway-env stops a crashed car itself
        c = self.control
        speed = float(self.speed)
        acceleration = (speed_after(speed, c, self.dt) - speed) / self.dt
        limit = _grip_limited_wheel_angle(self.LENGTH, speed)
        target = min(max(c.steer * MAX_WHEEL_ANGLE, -limit), limit)
        current = float(self.action["steering"])
        step = WHEEL_RATE * self.dt
        wheel = current + min(max(target - current, -step), step)
        self.action = {"steering": wheel, "acceleration": acceleration}
