"""The browser page served at `/`, driven in headless Chromium: it starts a session, shows its
live video and stats, drives with the keyboard, reports refusals, and ends the session.

Needs Debian's `chromium` (/usr/bin/chromium) and the Python `playwright` package (in the
`test` extra); Playwright drives the system browser, it never downloads one. `.ci/run`
installs Chromium.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
import requests

import deployments
from tests.waiting import eventually
# Small queue (N=6 steps, T=3) so frames come out after a few rounds; one session at most, so
# a second tab is refused.
OVERRIDES = {
    "pipeline.steps": "6", "pipeline.window": "3", "world.vehicles": "8",
    "serve.max_sessions": "1", "serve.graceful_shutdown_s": "1.0",
}
WAIT_S = 120.0  # upper bound for anything to happen; a healthy run takes a few seconds
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
INSTALL_HINT = (
    "install them with `apt-get install -y chromium` (Debian's package, /usr/bin/chromium) and "
    "`.venv/bin/python -m pip install playwright` (or `pip install -e .[test]`); do not run "
    "`playwright install`: the test drives the system browser. `.ci/run` installs both."
)


def chromium_path() -> str:
    path = os.environ.get("DWM_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.fail(f"the browser page test needs Chromium, and {path} is not there: {INSTALL_HINT}")
    return path


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (the system binary) under Playwright."""
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the browser page test needs the Python package playwright: {INSTALL_HINT}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def base(browser, ray_runtime) -> Iterator[str]:
    """The Serve app on the run's shared Ray and Serve (tests/conftest.py); its URL."""
    with ray_runtime.serve_app(deployments.app(OVERRIDES), "test-serve-page") as url:
        yield url


def sessions(base: str, token: str) -> list[dict]:
    """The sessions `token` sees (sessions are private)."""
    r = requests.get(f"{base}/sessions", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def server_state(base: str, session_id: str, token: str) -> dict:
    r = requests.get(f"{base}/sessions/{session_id}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


class Tab:
    """One page of the app in the browser, recording the script errors it raises."""

    def __init__(self, browser, base: str, **context):
        self.context = browser.new_context(**{"viewport": {"width": 1100, "height": 800}, **context})
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_S * 1000)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        response = self.page.goto(f"{base}/")
        assert response is not None and response.status == 200

    def text(self, selector: str) -> str:
        return self.page.text_content(selector) or ""

    def attr(self, selector: str, name: str) -> str | None:
        return self.page.get_attribute(selector, name)

    def has_class(self, selector: str, name: str) -> bool:
        return self.page.eval_on_selector(selector, "(el, name) => el.classList.contains(name)", name)

    def stat(self, name: str) -> float | None:
        """A number the page put on #stats (data-speed, data-frames), or None before any."""
        value = self.attr("#stats", f"data-{name}")
        return None if value in (None, "") else float(value)

    def wait_stat(self, name: str, above: float, what: str) -> float:
        """Wait until the page's stat `name` is above `above`; its value then."""
        self.page.wait_for_function(
            "([name, above]) => { const v = document.getElementById('stats').dataset[name];"
            " return v !== undefined && v !== '' && Number(v) > above; }",
            arg=[name, above], timeout=WAIT_S * 1000, polling=200,
        )
        value = self.stat(name)
        assert value is not None and value > above, what
        return value

    def video_sample(self) -> dict:
        """The <img>'s current picture, drawn into a canvas (same origin: not tainted): its size,
        a hash of its pixels, and the spread of its pixel values."""
        return self.page.eval_on_selector("#video", """(img) => {
            const w = img.naturalWidth, h = img.naturalHeight;
            if (!img.complete && !w) return {w: 0, h: 0, hash: 0, spread: 0};
            if (!w || !h) return {w, h, hash: 0, spread: 0};
            const c = document.createElement("canvas");
            c.width = w; c.height = h;
            const g = c.getContext("2d");
            g.drawImage(img, 0, 0);
            const d = g.getImageData(0, 0, w, h).data;
            let hash = 2166136261, lo = 255, hi = 0;
            for (let i = 0; i < d.length; i += 4) {
                const v = (d[i] + d[i + 1] + d[i + 2]) / 3;
                if (v < lo) lo = v;
                if (v > hi) hi = v;
                hash = Math.imul(hash ^ d[i] ^ (d[i + 1] << 8) ^ (d[i + 2] << 16), 16777619) >>> 0;
            }
            return {w, h, hash, spread: hi - lo};
        }""")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser, base) -> Iterator[Tab]:
    t = Tab(browser, base)
    try:
        yield t
    finally:
        # End the session a failed test left open, with the token the page holds.
        left = t.page.evaluate("() => session && [session.id, session.token]")
        t.close()
        if left:
            requests.delete(f"{base}/sessions/{left[0]}", headers={"Authorization": f"Bearer {left[1]}"}, timeout=60)


# ----------------------------------------------------------------------------- the test


def test_the_page_starts_a_session_shows_its_video_drives_it_and_ends_it(tab, browser, base):
    page = tab.page
    assert requests.get(f"{base}/sessions", timeout=30).json() == []
    # This server records nothing (no serve.record_dir): asking for it is refused as not
    # offered here, naming the key, and starts no session.
    r = requests.post(f"{base}/sessions", json={"record": True}, timeout=60)
    assert r.status_code == 403 and "serve.record_dir" in r.json()["detail"][0]["msg"], r.text
    assert tab.text("#stats").strip() == "no session"
    assert page.is_disabled("#stop")

    # New session: the server has it, and the page names it and shows its stats.
    page.click("#start")
    page.wait_for_function("() => document.getElementById('session').textContent.includes('session ')")
    session_id = tab.text("#session").split("session ", 1)[1].strip()
    token = page.evaluate("() => session.token")  # the driver's, which the page keeps
    assert [s["id"] for s in sessions(base, token)] == [session_id]
    assert server_state(base, session_id, token)["control"]["autopilot"] is False
    assert page.is_disabled("#start") and page.is_enabled("#stop")
    # The page's list of the sessions it may see: this one (sessions are private), being watched.
    page.wait_for_function("(id) => document.getElementById('list-items').textContent.includes(id)", arg=session_id)
    assert page.is_hidden("#list-none") and page.is_disabled("#list-items button")
    frames = tab.wait_stat("frames", 0, "the page's stats to count frames")
    assert "frames" in tab.text("#stats") and "speed" in tab.text("#stats")
    assert tab.text("#error") == ""

    # The video element shows the stream, and its picture changes as new frames arrive.
    src = tab.attr("#video", "src")
    # The stream's URL from the server, with a viewer token (an <img> sends no header).
    assert src and src.split("?token=")[0].endswith(f"/sessions/{session_id}/video.mjpg"), src
    assert token not in src
    seen = set()

    def new_pictures() -> bool:
        sample = tab.video_sample()
        if sample["w"] > 0:
            assert sample["w"] > sample["h"] > 0, sample  # the camera views side by side
            assert sample["spread"] > 20, f"the video element shows a flat picture: {sample}"
            seen.add(sample["hash"])
        return len(seen) >= 3

    eventually(new_pictures, "the video element to show 3 different frames")
    assert tab.wait_stat("frames", frames, "more frames counted") > frames

    # A second tab cannot start another session (serve.max_sessions=1): it says why.
    other = Tab(browser, base)
    try:
        other.page.click("#start")
        other.page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
        assert "max_sessions" in other.text("#error"), other.text("#error")
        assert other.text("#session") == "" and other.page.is_enabled("#start")
        assert other.errors == []
    finally:
        other.close()
    assert [s["id"] for s in sessions(base, token)] == [session_id]

    # Hold W: the throttle reaches the server and the page's speed rises above where it was
    # (coasting with the pedals up only ever slows the car down).
    assert server_state(base, session_id, token)["control"]["throttle"] == 0.0
    speed = tab.stat("speed")
    assert speed is not None
    page.keyboard.down("w")
    try:
        assert tab.has_class("#key-w", "on")
        eventually(lambda: server_state(base, session_id, token)["control"]["throttle"] > 0,
                   "the held W to reach the server as throttle")
        tab.wait_stat("speed", speed + 1.0, "the page's speed to rise while W is held")
    finally:
        page.keyboard.up("w")
    assert not tab.has_class("#key-w", "on")
    eventually(lambda: server_state(base, session_id, token)["control"]["throttle"] == 0.0,
               "releasing W to lift the throttle")

    # Q toggles reverse, E toggles autopilot: highlighted on the page and sent to the server.
    for key, field in (("q", "reverse"), ("e", "autopilot")):
        page.keyboard.press(key)
        assert tab.has_class(f"#key-{key}", "on")
        eventually(lambda field=field: server_state(base, session_id, token)["control"][field] is True,
                   f"{key.upper()} to turn {field} on")
        page.keyboard.press(key)
        assert not tab.has_class(f"#key-{key}", "on")
        eventually(lambda field=field: server_state(base, session_id, token)["control"][field] is False,
                   f"{key.upper()} again to turn {field} off")

    # The layout overlay is switched off from the page; recording is refused on this server
    # (no serve.record_dir), with the server's reason shown; there is nothing to download.
    assert page.is_enabled("#overlay") and page.is_checked("#overlay")
    assert server_state(base, session_id, token)["options"]["overlay"] is True
    page.uncheck("#overlay")
    eventually(lambda: server_state(base, session_id, token)["options"]["overlay"] is False,
               "unticking the overlay to reach the server")
    page.click("#record")
    page.wait_for_function("() => document.getElementById('error').textContent.includes('serve.record_dir')")
    assert tab.text("#record") == "Record" and page.is_hidden("#download")

    # End session: the server has no sessions left, and the page is back where it started.
    page.click("#stop")
    eventually(lambda: sessions(base, token) == [], "the session to end on the server")
    page.wait_for_function("() => document.getElementById('stats').textContent.trim() === 'no session'")
    assert tab.attr("#video", "src") is None
    assert page.is_enabled("#start") and page.is_disabled("#stop")
    assert tab.text("#session") == "" and tab.text("#error") == ""
    assert page.is_disabled("#overlay") and page.is_disabled("#record")
    assert tab.errors == [], tab.errors


def test_on_a_phone_the_page_fits_says_what_it_shows_and_drives_by_touch(browser, base):
    # A phone-sized touch screen (iPhone 12/13/14's CSS viewport).
    tab = Tab(browser, base, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
              device_scale_factor=3)
    page = tab.page
    try:
        # Before any session: words where the video will be, never a broken image.
        assert page.is_visible("#placeholder") and "Start a session" in tab.text("#placeholder")
        assert page.is_hidden("#video") and tab.attr("#video", "src") is None
        page.tap("#start")
        page.wait_for_function("() => session !== null")
        token, session_id = page.evaluate("() => [session.token, session.id]")

        # Until the first picture the queue's warm-up shows; then the video, under its cameras' names.
        tab.wait_stat("frames", 0, "the first frames")
        page.wait_for_selector("#video", state="visible")
        assert page.is_hidden("#placeholder") and page.is_hidden("#warmup")
        cameras = page.eval_on_selector_all("#cameras span", "spans => spans.map(s => s.textContent)")
        assert cameras == server_state(base, session_id, token)["cameras"] == ["CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"]
        # The tiny model has random weights: the page says so, so noise is not taken for a fault.
        assert "random weights" in tab.text("#model") and "tiny" in tab.text("#model")
        # It fits the screen: nothing to scroll sideways, the video as wide as the page allows.
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
        box = page.locator("#video").bounding_box()
        assert box is not None and 300 < box["width"] <= 390

        # Touch and hold W: throttle while held, none once let go.
        page.dispatch_event("#key-w", "pointerdown", {"pointerType": "touch", "isPrimary": True})
        assert tab.has_class("#key-w", "on")
        eventually(lambda: server_state(base, session_id, token)["control"]["throttle"] > 0, "a held W to throttle")
        page.dispatch_event("#key-w", "pointerup", {"pointerType": "touch", "isPrimary": True})
        eventually(lambda: server_state(base, session_id, token)["control"]["throttle"] == 0.0, "letting go of W")
        page.dispatch_event("#key-e", "pointerdown", {"pointerType": "touch", "isPrimary": True})  # a toggle
        eventually(lambda: server_state(base, session_id, token)["control"]["autopilot"] is True, "E to engage autopilot")

        page.tap("#stop")
        eventually(lambda: sessions(base, token) == [], "the session to end")
        page.wait_for_selector("#placeholder", state="visible")
        assert page.is_hidden("#video") and tab.text("#model") == "" and tab.text("#cameras") == ""
        assert tab.errors == [], tab.errors
    finally:
        left = page.evaluate("() => session && [session.id, session.token]")
        tab.close()
        if left:
            requests.delete(f"{base}/sessions/{left[0]}", headers={"Authorization": f"Bearer {left[1]}"}, timeout=60)


def test_a_session_started_elsewhere_is_watched_with_a_viewer_token_and_driven_with_the_drivers(tab, base):
    page = tab.page
    created = requests.post(f"{base}/sessions", json={}, timeout=60).json()
    sid, driver = created["id"], created["token"]
    auth = {"Authorization": f"Bearer {driver}"}
    try:
        # A private session started elsewhere is not in this page's list.
        page.wait_for_selector("#list-none", state="visible")
        assert sid not in tab.text("#list-items")
        viewer = requests.post(f"{base}/sessions/{sid}/share", headers=auth, timeout=30).json()["token"]

        # Watching: the video and the stats of that session, and the keys drive nothing.
        page.fill("#join-id", sid)
        page.fill("#join-token", viewer)
        page.click("#watch")
        page.wait_for_function("() => document.getElementById('session').textContent.includes('watching session')")
        assert viewer in (tab.attr("#video", "src") or "") and driver not in (tab.attr("#video", "src") or "")
        tab.wait_stat("frames", 0, "the watched session's frames")
        page.wait_for_selector("#video", state="visible")
        assert page.is_disabled("#overlay") and page.is_disabled("#record")  # the driver's to change
        page.keyboard.down("w")
        page.keyboard.up("w")
        page.click("#stop")  # leaving a watched session does not end it
        page.wait_for_function("() => document.getElementById('stats').textContent.trim() === 'no session'")
        state = server_state(base, sid, driver)
        assert state["control"]["seq"] == 0 and state["control"]["throttle"] == 0.0  # no control was sent

        # The page lists the session it left, to watch again (no driving with a viewer's token).
        page.wait_for_function("(id) => document.getElementById('list-items').textContent.includes(id)", arg=sid)
        assert page.locator("#list-items button").all_text_contents() == ["Watch"]
        page.click("#list-items button")
        page.wait_for_function("() => document.getElementById('session').textContent.includes('watching session')")
        assert viewer in (tab.attr("#video", "src") or "")
        page.click("#stop")
        page.wait_for_function("() => document.getElementById('stats').textContent.trim() === 'no session'")

        # Driving it with the driver's token: a held W throttles it; leaving keeps it running.
        page.fill("#join-token", driver)
        page.click("#drive")
        page.wait_for_function("() => document.getElementById('session').textContent.includes('driving session')")
        page.keyboard.down("w")
        eventually(lambda: server_state(base, sid, driver)["control"]["throttle"] > 0, "the held W to throttle")
        page.keyboard.up("w")
        page.click("#stop")
        page.wait_for_function("() => document.getElementById('stats').textContent.trim() === 'no session'")
        assert [s["id"] for s in sessions(base, driver)] == [sid]
        # Left, it is listed to watch or drive again with the driver's token.
        page.wait_for_function("() => document.getElementById('list-items').textContent.includes('Drive')")
        page.click("#list-items button:text('Drive')")
        page.wait_for_function("() => document.getElementById('session').textContent.includes('driving session')")
        page.click("#stop")
        page.wait_for_function("() => document.getElementById('stats').textContent.trim() === 'no session'")

        # A wrong token is refused on the page, with the server's reason.
        page.fill("#join-token", "not-a-token")
        page.click("#watch")
        page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
        assert tab.text("#session") == ""
        assert tab.errors == [], tab.errors
    finally:
        requests.delete(f"{base}/sessions/{sid}", headers=auth, timeout=60)
