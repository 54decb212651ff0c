"""Video out: the composed strip, the MP4 recording and the live RTSP push, decoded back."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dwm.pipelines.decode import to_uint8_views
from dwm.video import StreamConnectionError, VideoEncoder, compose_strip, session_rtsp_url
from dwm.video.background import BackgroundEncoder
from tests.waiting import eventually, free_port

ROOT = Path(__file__).resolve().parents[1]
H, W = 172, 912  # the reference's 3-view strip
ID_BITS = 8
BAR_WIDTH = 24
SHOWN_WITHIN_S = 120.0  # for all the frames of a test to be decoded: an upper bound, not a pace


# ----------------------------------------------------------------------------- test frames


def make_frame(k: int, h: int = H, w: int = W) -> np.ndarray:
    """Frame k: its index in 8 black/white blocks on the top half, a bar at x = 30 k below."""
    img = np.full((h, w, 3), 40, np.uint8)
    block = w // ID_BITS
    for b in range(ID_BITS):
        img[: h // 2, b * block : (b + 1) * block] = 255 if (k >> b) & 1 else 0
    x = (30 * k) % (w - BAR_WIDTH)
    img[h // 2 :, x : x + BAR_WIDTH] = (255, 200, 0)
    return img


def read_id(img: np.ndarray) -> int:
    h, w = img.shape[:2]
    block = w // ID_BITS
    top = img[h // 8 : 3 * h // 8]
    bits = [top[:, b * block + 8 : (b + 1) * block - 8].mean() > 128 for b in range(ID_BITS)]
    return sum(int(bit) << b for b, bit in enumerate(bits))


def read_bar_x(img: np.ndarray) -> int:
    """Left edge of the bar, from the brightest columns of the lower half."""
    h = img.shape[0]
    column = img[h // 2 + 8 : h - 8, :, 0].astype(float).mean(axis=0)
    return int(np.flatnonzero(column > 150).min())


def assert_matches_sent(img: np.ndarray, k: int) -> None:
    assert img.shape == (H, W, 3)
    assert read_id(img) == k
    assert abs(read_bar_x(img) - (30 * k) % (W - BAR_WIDTH)) <= 2
    # Lossy, but close to what was sent.
    assert np.abs(img.astype(int) - make_frame(k).astype(int)).mean() < 6


def decode_file(path: Path) -> list[av.VideoFrame]:
    with av.open(str(path)) as c:
        return list(c.decode(video=0))


# ----------------------------------------------------------------------------- RTSP receiver


def receive(url: str, queue: mp.Queue) -> None:
    """An RTSP server in FFmpeg's listen mode: takes one publisher, sends back what it decodes,
    and at the end the error lines FFmpeg logged while reading and decoding the stream.

    Runs in its own process: PyAV keeps the GIL while a publisher connects, so a receiver
    thread in the publisher's process could never answer it.
    """
    try:
        av.logging.set_level(av.logging.ERROR)
        with av.logging.Capture(local=False) as logged:
            with av.open(
                url,
                options={"rtsp_flags": "listen", "listen_timeout": "30", "probesize": "32",
                         "analyzeduration": "0"},
                timeout=(30.0, 10.0),
            ) as c:
                for packet in c.demux(c.streams.video[0]):
                    for frame in packet.decode():
                        queue.put(("frame", frame.to_ndarray(format="rgb24")))
        errors = [f"[{name}] {text.strip()}" for level, name, text in logged if level <= av.logging.ERROR]
        queue.put(("done", errors))
    except BaseException as e:
        queue.put(("error", repr(e)))


class Receiver:
    """Runs `receive` in a child process and hands its decoded frames to the test."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or f"rtsp://127.0.0.1:{free_port()}/live"
        ctx = mp.get_context("spawn")
        self._queue = ctx.Queue()
        self._process = ctx.Process(target=receive, args=(self.url, self._queue), daemon=True)
        self._process.start()

    def next_frame(self, timeout: float) -> np.ndarray | None:
        """The next decoded frame, or None when none came within `timeout` s."""
        try:
            kind, value = self._queue.get(timeout=timeout)
        except queue_module.Empty:
            return None
        assert kind == "frame", f"the RTSP receiver stopped: {kind} {value}"
        return value

    def all_frames(self) -> list[np.ndarray]:
        """Every frame still to come, until the publisher has closed the stream, which must end
        cleanly: no error logged by FFmpeg's reader or decoder."""
        frames = []
        while True:
            kind, value = self._queue.get(timeout=30)
            if kind == "done":
                assert value == [], f"FFmpeg logged errors reading the stream: {value}"
                break
            assert kind == "frame", f"the RTSP receiver failed: {value}"
            frames.append(value)
        self._process.join(timeout=30)
        return frames

    def stop(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=10)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def connect(receiver: Receiver, first_frame: np.ndarray, record_path: Path | None = None) -> VideoEncoder:
    """Publish the first frame, retrying while the receiver is not listening yet (its process
    imports this module first: seconds on a loaded machine)."""
    deadline = time.monotonic() + SHOWN_WITHIN_S
    while True:
        publisher = VideoEncoder(record_path=record_path, rtsp_url=receiver.url, fps=10)
        try:
            publisher.publish(first_frame, 0.0)
            return publisher
        except StreamConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# ----------------------------------------------------------------------------- RTSP


def test_rtsp_receiver_gets_every_frame_in_order_with_its_content(receiver):
    n = 30
    with connect(receiver, make_frame(0)) as publisher:
        for k in range(1, n):
            publisher.publish(make_frame(k), k / 10)
    frames = receiver.all_frames()

    # Closing ends the stream on a picture: the last one, shown once more.
    assert len(frames) == n + 1
    for k, img in enumerate(frames):
        assert_matches_sent(img, min(k, n - 1))
    # The picture changes over time.
    assert np.abs(frames[0].astype(int) - frames[n - 1].astype(int)).mean() > 10


def test_rtsp_receiver_shows_each_frame_before_the_next_is_sent(receiver):
    # FFmpeg's RTSP reader would hold frame k until frame k+1 arrives; the publisher must end
    # each access unit so the viewer sees it at once. Frame k+1 is sent only once frame k has
    # been shown, or when the whole test's time is up (a generous bound: a loaded machine may
    # take seconds to decode a frame, a held frame never comes).
    n = 6
    deadline = time.monotonic() + SHOWN_WITHIN_S
    events = [("sent", 0)]
    with connect(receiver, make_frame(0)) as publisher:
        for k in range(1, n + 1):
            img = receiver.next_frame(timeout=max(deadline - time.monotonic(), 0.0))
            if img is not None:
                events.append(("decoded", read_id(img)))
            if k < n:
                events.append(("sent", k))
                publisher.publish(make_frame(k), k / 2)
    events += [("decoded", read_id(img)) for img in receiver.all_frames()]

    # (the last picture comes once more when the stream is closed)
    assert events == [e for k in range(n) for e in (("sent", k), ("decoded", k))] + [("decoded", n - 1)]


def test_rtsp_without_a_server_says_what_to_start():
    url = f"rtsp://127.0.0.1:{free_port()}/dwm/s1"
    publisher = VideoEncoder(rtsp_url=url, fps=10)
    with pytest.raises(StreamConnectionError) as info:
        publisher.publish(make_frame(0), 0.0)
    assert url in str(info.value) and "MediaMTX" in str(info.value)
    publisher.close()  # harmless after the failure
    with pytest.raises(RuntimeError, match="closed"):
        publisher.publish(make_frame(1), 0.1)


def test_rtsp_server_that_never_answers_times_out_with_a_clear_error():
    # A port that accepts TCP connections but never speaks RTSP. Run in a child process: a
    # publisher that hangs would otherwise hang the test run.
    code = """
import socket, sys
import numpy as np
from dwm.video import StreamConnectionError, VideoEncoder
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
url = f"rtsp://127.0.0.1:{server.getsockname()[1]}/dwm"
publisher = VideoEncoder(rtsp_url=url, connect_timeout=1.0)
try:
    publisher.publish(np.zeros((16, 16, 3), np.uint8), 0.0)
except StreamConnectionError as e:
    sys.exit(0 if url in str(e) else 2)
sys.exit(1)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, timeout=60, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_session_rtsp_url():
    assert session_rtsp_url("rtsp://127.0.0.1:8554/dwm/", "a1") == "rtsp://127.0.0.1:8554/dwm/a1"
    with pytest.raises(ValueError, match="session id"):
        session_rtsp_url("rtsp://127.0.0.1:8554/dwm", "a b/../c")
    with pytest.raises(ValueError, match="rtsp://host:port/path"):
        VideoEncoder(rtsp_url="http://127.0.0.1:8554/dwm")


# ----------------------------------------------------------------------------- MP4


def test_mp4_decodes_every_frame_in_order_at_sim_times(tmp_path):
    path = tmp_path / "drive.mp4"
    n = 12
    sim_times = [round(0.1 * k, 3) for k in range(n)]
    with VideoEncoder(record_path=path, fps=10) as publisher:
        for k, t in enumerate(sim_times):
            publisher.publish(make_frame(k), t)
        assert publisher.frames_published == n

    frames = decode_file(path)
    assert len(frames) == n
    for k, frame in enumerate(frames):
        assert (frame.height, frame.width) == (H, W)
        assert_matches_sent(frame.to_ndarray(format="rgb24"), k)
        assert frame.time == pytest.approx(sim_times[k], abs=1e-3)


def test_a_restarted_rtsp_receiver_gets_the_stream_again_and_the_recording_goes_on(tmp_path):
    """The RTSP server goes away mid-stream and comes back at the same address: the session's
    RTSP output reopens and the new server decodes what is sent from then on; the MP4 of the
    same frames (its own output) never notices."""
    first = Receiver()
    rtsp = BackgroundEncoder(lambda: VideoEncoder(rtsp_url=first.url, fps=10, connect_timeout=5.0),
                             max_pending=4, name="rtsp", retry_s=0.2)
    path = tmp_path / "drive.mp4"
    recording = BackgroundEncoder(lambda: VideoEncoder(record_path=path, fps=10), max_pending=10_000, name="mp4")
    sent = 0

    def send_until(condition, what: str) -> None:
        """Frames one at a time, each once the recording has written the one before (the
        pace of a live encoder), until `condition` holds (bounded by SHOWN_WITHIN_S)."""
        nonlocal sent
        deadline = time.monotonic() + SHOWN_WITHIN_S
        while not condition():
            assert time.monotonic() < deadline, f"no {what} after {sent} frames"
            for out in (rtsp, recording):
                out.submit(make_frame(sent % 256), sent / 10)
            sent += 1
            eventually(lambda: recording.published >= sent, "the recording to write the frame")

    second = None
    try:
        got_first: list[np.ndarray] = []
        send_until(lambda: got_first.append(first.next_frame(0)) or got_first[-1] is not None, "frame at the first server")
        assert rtsp.error is None
        came_back = rtsp.reconnects  # the first server may have been reached at a second try
        first.stop()  # the server goes away
        send_until(lambda: rtsp.error is not None, "error while the server is away")
        assert "RTSP" in rtsp.error and rtsp.reconnects == came_back
        second = Receiver(first.url)  # and comes back at the same address
        got: list[np.ndarray] = []
        send_until(lambda: got.append(second.next_frame(0)) or got[-1] is not None, "frame at the restarted server")
        assert rtsp.reconnects == came_back + 1 and rtsp.error is None
        assert_matches_sent(got[-1], read_id(got[-1]))  # a whole frame of those sent, not a broken one
    finally:
        rtsp.close()
        recording.close()
        first.stop()
        if second is not None:
            second.stop()
    assert recording.error is None and recording.dropped == 0
    assert [read_id(f.to_ndarray(format="rgb24")) for f in decode_file(path)] == [k % 256 for k in range(sent)]


def test_mp4_and_rtsp_together_both_decode_fully(tmp_path, receiver):
    # The RTSP path adds a delimiter to each packet; the file must not get it.
    path = tmp_path / "both.mp4"
    n = 8
    publisher = connect(receiver, make_frame(0), record_path=path)
    with publisher:
        for k in range(1, n):
            publisher.publish(make_frame(k), k / 10)

    assert [read_id(img) for img in receiver.all_frames()] == [*range(n), n - 1]  # last shown again at the end
    frames = decode_file(path)
    assert len(frames) == n
    for k, frame in enumerate(frames):
        assert_matches_sent(frame.to_ndarray(format="rgb24"), k)


def test_mp4_timestamps_never_run_backwards(tmp_path):
    # Rule: a frame whose sim time is not after the previous one is placed one frame interval
    # (1/fps) after it, and the sim clock's steps are kept from there.
    path = tmp_path / "reset.mp4"
    sim_times = [0.0, 0.1, 0.1, 0.2, 0.0, 0.1]  # a repeated moment, then a world reset
    with VideoEncoder(record_path=path, fps=10) as publisher:
        for k, t in enumerate(sim_times):
            publisher.publish(make_frame(k), t)
    frames = decode_file(path)
    assert [read_id(f.to_ndarray(format="rgb24")) for f in frames] == list(range(len(sim_times)))
    assert [f.time for f in frames] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], abs=1e-3)


def test_odd_frame_sizes_are_padded_to_even(tmp_path):
    path = tmp_path / "odd.mp4"
    img = np.zeros((171, 301, 3), np.uint8)
    img[-1, :] = 255  # last row white: the added row repeats it
    with VideoEncoder(record_path=path, fps=10) as publisher:
        publisher.publish(img, 0.0)
        with pytest.raises(ValueError, match="frame size changed"):
            publisher.publish(np.zeros((172, 302, 3), np.uint8), 0.1)
    (frame,) = decode_file(path)
    out = frame.to_ndarray(format="rgb24")
    assert out.shape == (172, 302, 3)
    assert out[-1, :280].mean() > 200 and out[:150, :280].mean() < 30


def test_record_path_in_missing_folder_names_it(tmp_path):
    path = tmp_path / "no_such_folder" / "drive.mp4"
    with pytest.raises(FileNotFoundError) as info:
        VideoEncoder(record_path=path, fps=10)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)


def test_bad_frames_and_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="record_path, an rtsp_url"):
        VideoEncoder()
    with pytest.raises(ValueError, match="stream.preset"):
        VideoEncoder(record_path=tmp_path / "x.mp4", preset="not-a-preset")
    with VideoEncoder(record_path=tmp_path / "x.mp4") as publisher:
        with pytest.raises(ValueError, match="uint8"):
            publisher.publish(np.zeros((H, W, 3), np.float32), 0.0)
        with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
            publisher.publish(np.zeros((H, W), np.uint8), 0.0)
        with pytest.raises(ValueError, match="sim_time"):
            publisher.publish(np.zeros((H, W, 3), np.uint8), float("nan"))


def test_from_config_uses_the_stream_group(tmp_path):
    cfg = OmegaConf.load(ROOT / "conf" / "stream" / "default.yaml")
    path = tmp_path / "cfg.mp4"
    publisher = VideoEncoder.from_config(cfg, record_path=path, fps=10)
    publisher.publish(make_frame(3), 0.0)
    publisher.close()
    publisher.close()  # closing twice is harmless
    assert [read_id(f.to_ndarray(format="rgb24")) for f in decode_file(path)] == [3]

    cfg.preset = "not-a-preset"
    with pytest.raises(ValueError, match="not-a-preset"):
        VideoEncoder.from_config(cfg, record_path=path, fps=10)


# ----------------------------------------------------------------------------- compose


def test_strip_has_the_views_side_by_side_in_rig_order():
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    views = colours[:, :, None, None].expand(3, 3, 176, 304).contiguous()
    strip = compose_strip(to_uint8_views(views, [172, 304]))
    assert strip.shape == (172, 3 * 304, 3) and strip.dtype == np.uint8
    for v in range(3):
        third = strip[:, v * 304 : (v + 1) * 304]
        assert (third == (colours[v].numpy() * 255).astype(np.uint8)).all()


@pytest.mark.parametrize("size", [(172, 304), (88, 152)])
def test_views_resize_matches_a_bilinear_image_resize(size):
    h, w = size
    gen = torch.Generator().manual_seed(0)
    views = torch.rand(2, 3, 176, 304, generator=gen)
    out = to_uint8_views(views, (h, w))
    assert out.shape == (2, h, w, 3) and out.dtype == torch.uint8
    for v in range(2):
        src = Image.fromarray((views[v].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        expected = np.asarray(src.resize((w, h), Image.BILINEAR)).astype(int)
        assert np.abs(out[v].numpy().astype(int) - expected).max() <= 2


def test_views_are_clipped_and_rounded_to_the_nearest_level():
    views = torch.tensor([-0.5, 0.0, 0.3 / 255, 0.7 / 255, 254.4 / 255, 1.0, 1.5]).reshape(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8_views(views, (1, 7))
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 1, 254, 255, 255]


def test_overlay_follows_the_preview_rule():
    h, w = 4, 6
    views = torch.full((2, h, w, 3), 100, dtype=torch.uint8)
    boxes = torch.zeros(2, 3, h, w)
    hdmap = torch.zeros(2, 3, h, w)
    boxes[0, 0, 1, 1] = 1.0  # a red box pixel
    hdmap[0, 1, 1, 1] = 0.5  # under it, half green map: max per channel
    hdmap[1, 2, 2, 3] = 1.0  # a blue map pixel in the second view
    boxes[1, :, 3, 5] = 0.25  # a faint grey box pixel
    strip = compose_strip(views, layout=torch.cat([boxes, hdmap], dim=1))

    cond = np.maximum(boxes.numpy(), hdmap.numpy()).transpose(0, 2, 3, 1)  # (V, h, w, 3)
    alpha = 0.6 * cond.max(axis=-1, keepdims=True)
    expected = (cond * 255 * alpha + 100 * (1 - alpha)).astype(np.uint8)
    expected = np.concatenate(list(expected), axis=1)  # views side by side
    assert np.abs(strip.astype(int) - expected.astype(int)).max() <= 1
    # Where the layout is empty the view is untouched; where it is drawn it shows.
    assert (strip[0, 0] == 100).all()
    assert strip[1, 1, 0] > 150 and strip[1, 1, 2] < 60


def test_overlay_layout_is_resized_nearest_to_the_view_size():
    gen = torch.Generator().manual_seed(1)
    layout = (torch.rand(3, 6, 43, 76, generator=gen) > 0.8).float()
    views = np.zeros((3, 86, 152, 3), np.uint8)
    strip = compose_strip(views, layout=layout)
    cond = np.maximum(layout[:, :3].numpy(), layout[:, 3:].numpy()).transpose(0, 2, 3, 1)
    cond = cond.repeat(2, axis=1).repeat(2, axis=2)  # exactly 2x nearest
    alpha = 0.6 * cond.max(axis=-1, keepdims=True)
    expected = np.concatenate(list((cond * 255 * alpha).astype(np.uint8)), axis=1)
    assert np.abs(strip.astype(int) - expected.astype(int)).max() <= 1


def test_compose_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"\(V, h, w, 3\) uint8"):
        compose_strip(torch.zeros(3, 8, 8, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(V, h, w, 3\) uint8"):
        compose_strip(torch.zeros(3, 8, 8, 3))  # float views: convert them with to_uint8_views
    with pytest.raises(ValueError, match=r"\(V, 6, H, W\)"):
        compose_strip(torch.zeros(3, 8, 8, 3, dtype=torch.uint8), layout=torch.zeros(3, 3, 8, 8))
    with pytest.raises(ValueError, match="must match"):
        compose_strip(torch.zeros(3, 8, 8, 3, dtype=torch.uint8), layout=torch.zeros(2, 6, 8, 8))
    with pytest.raises(ValueError, match=r"\(V, 3, H, W\)"):
        to_uint8_views(torch.zeros(3, 4, 8, 8), [8, 8])