"""The keyboard client: its key-to-control mapping, and a clean failure without a display."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dwm.client.keyboard import BRAKE, STEER, THROTTLE, KeyboardState

ROOT = Path(__file__).resolve().parents[1]


def test_held_keys_drive_and_toggles_flip():
    keys = KeyboardState()
    assert keys.control() == {"throttle": 0.0, "brake": 0.0, "steer": 0.0, "reverse": False, "autopilot": False}
    assert keys.press("w") and keys.press("a")
    assert keys.control()["throttle"] == THROTTLE == 0.8 and keys.control()["steer"] == -STEER == -0.8
    assert not keys.press("w")  # held already: nothing new to send
    assert keys.press("d")  # both sides: straight
    assert keys.control()["steer"] == 0.0
    assert keys.release("w") and keys.release("a")
    assert keys.control()["throttle"] == 0.0 and keys.control()["steer"] == STEER
    assert keys.press("s") and keys.control()["brake"] == BRAKE == 1.0
    assert keys.press("q") and keys.control()["reverse"] is True
    assert keys.press("q") and keys.control()["reverse"] is False
    assert keys.press("e") and keys.control()["autopilot"] is True
    assert not keys.press("x") and not keys.release("x")


def test_without_a_display_it_says_so_and_exits():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run(
        [sys.executable, "-m", "dwm.client.keyboard", "--url", "http://127.0.0.1:9", "--session", "s", "--token", "t"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "needs a display" in result.stderr and "Traceback" not in result.stderr


def test_a_session_without_its_token_is_refused_before_anything_starts():
    result = subprocess.run(
        [sys.executable, "-m", "dwm.client.keyboard", "--session", "s"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "--token" in result.stderr
