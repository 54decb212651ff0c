"""Drive a session from the keyboard: a small Tk window with the Q W E / A S D panel.

    python -m dwm.client.keyboard --url http://localhost:8000 --session ID --token TOKEN
    python -m dwm.client.keyboard --url http://localhost:8000      # starts a new session

W throttle, S brake, A / D steer while held (keys light up while held); Q toggles reverse,
E toggles autopilot. Controls go to `POST /sessions/{id}/control`; the video is the session's
MJPEG stream (`ffplay -fflags nobuffer <mjpeg url>`) or RTSP path.
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass, field

from dwm.client.api import ApiError, SessionClient, add_session_options, check_session_options, open_session

# The reference's keyboard panel values.
THROTTLE = 0.8
STEER = 0.8
BRAKE = 1.0
HELD_KEYS = "wasd"
TOGGLE_KEYS = "qe"
RELEASE_DEBOUNCE_MS = 40  # X11 auto-repeat sends release+press pairs while a key is held


@dataclass
class KeyboardState:
    """Which keys are held and the toggles; `control()` is what to send."""

    held: set[str] = field(default_factory=set)
    reverse: bool = False
    autopilot: bool = False

    def press(self, key: str) -> bool:
        """A key went down; True when the control changes."""
        if key == "q":
            self.reverse = not self.reverse
            return True
        if key == "e":
            self.autopilot = not self.autopilot
            return True
        if key in HELD_KEYS and key not in self.held:
            self.held.add(key)
            return True
        return False

    def release(self, key: str) -> bool:
        if key in self.held:
            self.held.discard(key)
            return True
        return False

    def control(self) -> dict:
        steer = (-STEER if "a" in self.held else 0.0) + (STEER if "d" in self.held else 0.0)
        return {
            "throttle": THROTTLE if "w" in self.held else 0.0,
            "brake": BRAKE if "s" in self.held else 0.0,
            "steer": steer,
            "reverse": self.reverse,
            "autopilot": self.autopilot,
        }


class ControlSender:
    """Sends controls on a thread, newest first: a slow server never freezes the window."""

    def __init__(self, client: SessionClient, on_result):
        self.client, self.on_result = client, on_result
        self._latest: dict | None = None
        self._wake = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def send(self, changes: dict) -> None:
        with self._wake:
            self._latest = changes
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._latest is None:
                    self._wake.wait()
                changes, self._latest = self._latest, None
            try:
                self.client.control(**changes)
                self.on_result(None)
            except ApiError as err:
                self.on_result(str(err))


def run_window(tk, client: SessionClient, root) -> None:
    """The panel: six key tiles, a status line, stats refreshed twice a second."""
    root.title(f"dwm-serve: session {client.id}")
    state = KeyboardState()
    tiles = {}
    frame = tk.Frame(root, padx=10, pady=10)
    frame.pack()
    for row, keys in enumerate(("qwe", "asd")):
        for col, key in enumerate(keys):
            tile = tk.Label(frame, text=key.upper(), width=4, height=2, relief="raised", font=("TkDefaultFont", 16))
            tile.grid(row=row, column=col, padx=3, pady=3)
            tiles[key] = tile
    status = tk.Label(root, text="W throttle  S brake  A/D steer  Q reverse  E autopilot", anchor="w")
    status.pack(fill="x", padx=10)
    stats = tk.Label(root, text="", anchor="w", font=("TkFixedFont", 10))
    stats.pack(fill="x", padx=10, pady=(0, 10))
    default_bg = tiles["w"].cget("background")

    def show() -> None:
        lit = set(state.held) | ({"q"} if state.reverse else set()) | ({"e"} if state.autopilot else set())
        for key, tile in tiles.items():
            tile.configure(background="#3a7" if key in lit else default_bg, relief="sunken" if key in lit else "raised")

    def result(error: str | None) -> None:
        root.after(0, lambda: status.configure(text=error or "W throttle  S brake  A/D steer  Q reverse  E autopilot"))

    sender = ControlSender(client, result)
    pending_release: dict[str, str] = {}

    def key_down(event) -> None:
        key = event.keysym.lower()
        if key in pending_release:  # auto-repeat: the key never went up
            root.after_cancel(pending_release.pop(key))
            return
        if state.press(key):
            show()
            sender.send(state.control())

    def key_up(event) -> None:
        key = event.keysym.lower()
        if key not in HELD_KEYS:
            return

        def released() -> None:
            pending_release.pop(key, None)
            if state.release(key):
                show()
                sender.send(state.control())

        pending_release[key] = root.after(RELEASE_DEBOUNCE_MS, released)

    def refresh() -> None:
        def fetch() -> None:
            try:
                s = client.state()
                t = s["stats"]
                latency = t["control_latency_frames"]
                text = (
                    f"{s['state']}  {t['ego_speed'] * 3.6:5.1f} km/h  {t['fps']:4.1f} fps  "
                    f"frames {t['frames_out']}  latency {'-' if latency is None else latency} frames  "
                    f"sim {t['sim_time']:.1f} s"
                )
            except ApiError as err:
                text = str(err)
            root.after(0, lambda: stats.configure(text=text))

        threading.Thread(target=fetch, daemon=True).start()
        root.after(500, refresh)

    root.bind("<KeyPress>", key_down)
    root.bind("<KeyRelease>", key_up)
    refresh()
    root.mainloop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dwm.client.keyboard", description=__doc__.split("\n\n")[0])
    add_session_options(parser)
    args = parser.parse_args(argv)
    check_session_options(parser, args)

    try:
        import tkinter as tk
    except ImportError:
        print("error: this Python has no Tk (tkinter); install your system's python3-tk", file=sys.stderr)
        return 2
    try:
        root = tk.Tk()
    except tk.TclError as err:
        print(
            f"error: cannot open a window ({err}). The keyboard client needs a display: run it on a "
            "desktop, or with X forwarding (ssh -X), or set DISPLAY",
            file=sys.stderr,
        )
        return 2

    try:
        client = open_session(args)
    except ApiError as err:
        root.destroy()
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        run_window(tk, client, root)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
