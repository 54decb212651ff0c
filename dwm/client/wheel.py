"""Drive a session with a steering wheel and pedals (any joystick pygame sees).

    python -m dwm.client.wheel --list                                   # the joysticks found
    python -m dwm.client.wheel --url http://localhost:8000              # starts a new session
    python -m dwm.client.wheel --url ... --session ID --token TOKEN \\
        --steer 0,-1,1,0 --throttle 5,1,-1,0 --brake 1,1,-1,0           # pedals that read 1 at rest

Each axis is `id,min,max,default`, as the reference's wheel client takes it: the joystick axis
`id` read between `min` and `max` maps linearly onto the control's range (steer -1..1,
throttle and brake 0..1) and is clamped there; `min` > `max` inverts the axis; `default` is the
control's value when the joystick has no such axis. Defaults: steer `0,-1,1,0`, throttle
`5,0,1,0`, brake `1,0,1,0` (the reference's). Button 1 toggles reverse and button 3 the
autopilot when released (the reference's buttons; `--reverse-button`, `--autopilot-button`).
The wheel is read 20 times a second and a control is sent whenever it changed; the video is
the session's MJPEG stream, printed at the start.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

from dwm.client.api import ApiError, add_session_options, check_session_options, open_session
from dwm.client.keyboard import ControlSender

RATE_HZ = 20.0
RANGES = {"steer": (-1.0, 1.0), "throttle": (0.0, 1.0), "brake": (0.0, 1.0)}
DEFAULT_AXES = {"steer": "0,-1,1,0", "throttle": "5,0,1,0", "brake": "1,0,1,0"}
REVERSE_BUTTON = 1
AUTOPILOT_BUTTON = 3


@dataclass(frozen=True)
class Axis:
    """One control read from a joystick axis: `id`, the raw readings `lo` and `hi` that map onto
    the control's range `out`, and the control's `default` when the axis is missing."""

    id: int
    lo: float
    hi: float
    default: float
    out: tuple[float, float]

    @classmethod
    def parse(cls, name: str, text: str) -> Axis:
        """`id,min,max,default` for control `name`; ValueError naming the option otherwise."""
        parts = text.split(",")
        try:
            if len(parts) != 4:
                raise ValueError
            axis, lo, hi, default = int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3])
        except ValueError:
            raise ValueError(f"--{name} {text!r}: give id,min,max,default, e.g. {DEFAULT_AXES[name]}") from None
        out = RANGES[name]
        if axis < 0 or lo == hi or not out[0] <= default <= out[1]:
            raise ValueError(f"--{name} {text!r}: the axis id must be >= 0, min and max must differ, and the "
                             f"default must lie in {out[0]:g}..{out[1]:g}")
        return cls(axis, lo, hi, default, out)

    def value(self, axes: list[float]) -> float:
        """The control's value for the joystick's axis readings."""
        if self.id >= len(axes):
            return self.default
        b0, b1 = self.out
        v = (axes[self.id] - self.lo) / (self.hi - self.lo) * (b1 - b0) + b0
        return min(max(v, b0), b1)


@dataclass
class Wheel:
    """Axes and toggles: `control(axes)` is what to send."""

    steer: Axis
    throttle: Axis
    brake: Axis
    reverse_button: int = REVERSE_BUTTON
    autopilot_button: int = AUTOPILOT_BUTTON
    reverse: bool = False
    autopilot: bool = False

    def button_up(self, button: int) -> None:
        if button == self.reverse_button:
            self.reverse = not self.reverse
        elif button == self.autopilot_button:
            self.autopilot = not self.autopilot

    def control(self, axes: list[float]) -> dict:
        return {
            "steer": round(self.steer.value(axes), 3),
            "throttle": round(self.throttle.value(axes), 3),
            "brake": round(self.brake.value(axes), 3),
            "reverse": self.reverse,
            "autopilot": self.autopilot,
        }


def drive(wheel: Wheel, read, send, ticks: int | None = None, rate_hz: float = RATE_HZ, sleep=time.sleep) -> dict | None:
    """Read the wheel `rate_hz` times a second and `send` its control when it changed.

    read(): (axis readings, buttons released since the last read); send(control dict).
    ticks: stop after that many reads (None: until interrupted). Returns the last control sent."""
    last = None
    period = 1.0 / rate_hz
    k = 0
    while ticks is None or k < ticks:
        axes, released = read()
        for button in released:
            wheel.button_up(button)
        control = wheel.control(axes)
        if control != last:
            send(control)
            last = control
        k += 1
        if ticks is None or k < ticks:
            sleep(period)
    return last


def _pygame():
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # no window: only the event queue is needed
    import pygame

    pygame.display.init()
    pygame.joystick.init()
    return pygame


def list_joysticks() -> list[str]:
    pygame = _pygame()
    found = []
    for i in range(pygame.joystick.get_count()):
        j = pygame.joystick.Joystick(i)
        found.append(f"{i}: {j.get_name()}  axes {j.get_numaxes()}  buttons {j.get_numbuttons()}")
    return found


def joystick_reader(index: int):
    """read() for `drive` on pygame's joystick `index`."""
    pygame = _pygame()
    if index >= pygame.joystick.get_count():
        raise ValueError(f"--joystick {index}: pygame sees {pygame.joystick.get_count()} joystick(s); see --list")
    stick = pygame.joystick.Joystick(index)

    def read() -> tuple[list[float], list[int]]:
        released = [e.button for e in pygame.event.get()  # every event, so the queue never fills
                    if e.type == pygame.JOYBUTTONUP and getattr(e, "instance_id", None) == stick.get_instance_id()]
        return [stick.get_axis(a) for a in range(stick.get_numaxes())], released

    return read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dwm.client.wheel", description=__doc__.split("\n\n")[0])
    add_session_options(parser)
    parser.add_argument("--list", action="store_true", help="print the joysticks pygame sees and stop")
    parser.add_argument("--joystick", type=int, default=0, help="which joystick (default %(default)s)")
    for name, spec in DEFAULT_AXES.items():
        parser.add_argument(f"--{name}", default=spec, help=f"axis id,min,max,default (default {spec})")
    parser.add_argument("--reverse-button", type=int, default=REVERSE_BUTTON)
    parser.add_argument("--autopilot-button", type=int, default=AUTOPILOT_BUTTON)
    args = parser.parse_args(argv)

    if args.list:
        found = list_joysticks()
        print("\n".join(found) if found else "no joystick found (is it plugged in, and may this user read /dev/input?)")
        return 0
    check_session_options(parser, args)
    try:
        wheel = Wheel(*(Axis.parse(name, getattr(args, name)) for name in DEFAULT_AXES),
                      reverse_button=args.reverse_button, autopilot_button=args.autopilot_button)
        read = joystick_reader(args.joystick)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        client = open_session(args)
    except ApiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    def result(error: str | None) -> None:
        if error:
            print(f"control refused: {error}", file=sys.stderr)

    sender = ControlSender(client, result)
    try:
        drive(wheel, read, sender.send)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
