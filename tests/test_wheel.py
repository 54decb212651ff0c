"""The steering-wheel client: the reference's axis mapping (`id,min,max,default`, clamped,
inverted where min > max), its buttons, and controls sent only when they change."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dwm.client.wheel import DEFAULT_AXES, Axis, Wheel, drive


def default_wheel() -> Wheel:
    return Wheel(*(Axis.parse(name, spec) for name, spec in DEFAULT_AXES.items()))


def test_axes_map_linearly_onto_the_control_ranges_clamped_and_inverted():
    steer = Axis.parse("steer", "0,-1,1,0")
    assert [steer.value([x]) for x in (-1.0, -0.5, 0.0, 0.5, 1.0, 1.7)] == [-1.0, -0.5, 0.0, 0.5, 1.0, 1.0]
    pedal = Axis.parse("throttle", "5,1,-1,0")  # a pedal that reads 1 at rest and -1 pressed down
    axes = [0.0] * 6
    for raw, want in ((1.0, 0.0), (0.0, 0.5), (-1.0, 1.0), (-3.0, 1.0)):
        axes[5] = raw
        assert pedal.value(axes) == pytest.approx(want)
    assert Axis.parse("brake", "7,0,1,0.25").value([0.3] * 4) == 0.25  # no axis 7: the default


@pytest.mark.parametrize("name, text", [("steer", "0,-1,1"), ("throttle", "x,0,1,0"), ("brake", "1,1,1,0"),
                                        ("throttle", "5,0,1,2"), ("steer", "-1,-1,1,0")])
def test_a_bad_axis_spec_is_refused_naming_its_option(name, text):
    with pytest.raises(ValueError, match=f"--{name} '{text}'"):
        Axis.parse(name, text)


def test_the_wheel_sends_a_control_when_it_changes_and_its_buttons_toggle():
    wheel = default_wheel()
    #          steer  brake  -   -   -  throttle; buttons released
    readings = [([0.0, 0.0, 0, 0, 0, 0.0], []),
                ([0.0, 0.0, 0, 0, 0, 0.0], []),          # no change: nothing sent
                ([-0.4, 0.0, 0, 0, 0, 0.8], []),
                ([-0.4, 0.0, 0, 0, 0, 0.8], [1]),        # reverse
                ([0.2, 0.6, 0, 0, 0, 0.0], [3])]         # autopilot
    feed = iter(readings)
    sent = []
    last = drive(wheel, lambda: next(feed), sent.append, ticks=len(readings), sleep=lambda s: None)
    assert [(c["steer"], c["throttle"], c["brake"], c["reverse"], c["autopilot"]) for c in sent] == [
        (0.0, 0.0, 0.0, False, False),
        (-0.4, 0.8, 0.0, False, False),
        (-0.4, 0.8, 0.0, True, False),
        (0.2, 0.0, 0.6, True, True),
    ]
    assert last == sent[-1]


def test_list_says_when_no_joystick_is_there():
    # No joystick on a test machine: SDL's dummy video, no devices.
    result = subprocess.run([sys.executable, "-m", "dwm.client.wheel", "--list"], capture_output=True, text=True,
                            env={"SDL_VIDEODRIVER": "dummy", "SDL_JOYSTICK_DISABLE_UDEV": "1", "PATH": "/usr/bin"},
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no joystick found" in result.stdout
    result = subprocess.run([sys.executable, "-m", "dwm.client.wheel", "--steer", "0,1"], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 2 and "--steer '0,1'" in result.stderr
