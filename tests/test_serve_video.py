"""The Serve app's video pieces that run without Ray: JPEG/PNG stills and the background publisher."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from dwm.video.background import BackgroundEncoder
from dwm.video.stills import encode_jpeg, encode_png


def gradient(h: int = 172, w: int = 912) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, w)[None, :]  # red grows to the right
    img[..., 2] = np.linspace(0, 255, h)[:, None]  # blue grows downwards
    return img


def test_jpeg_decodes_to_the_image_in_rgb_order():
    img = gradient()
    decoded = cv2.imdecode(np.frombuffer(encode_jpeg(img, 90), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert decoded.shape == img.shape
    assert np.abs(decoded.astype(int) - img.astype(int)).mean() < 3  # lossy but close, not channel-swapped


def test_png_is_exact():
    img = gradient()
    decoded = cv2.imdecode(np.frombuffer(encode_png(img), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert np.array_equal(decoded, img)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), "image"])
def test_stills_refuse_what_is_not_an_rgb_image(bad):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB"):
        encode_jpeg(bad)


def test_jpeg_quality_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"\[1, 100\]"):
        encode_jpeg(gradient(), 0)


class FakeVideo:
    """Stands in for a VideoEncoder whose server is slow: each publish waits for `gate`."""

    def __init__(self, gate: threading.Event | None = None, fail_at: int | None = None):
        self.gate, self.fail_at = gate, fail_at
        self.times: list[float] = []
        self.closed = False

    def publish(self, image, sim_time):
        if self.gate is not None:
            self.gate.wait()
        if self.fail_at is not None and len(self.times) == self.fail_at:
            raise ConnectionError("the server dropped the stream")
        self.times.append(sim_time)

    def close(self, raise_errors=True):
        self.closed = True


def test_a_slow_output_never_blocks_and_keeps_the_newest_frames():
    gate = threading.Event()
    video = FakeVideo(gate)
    out = BackgroundEncoder(lambda: video, max_pending=3)
    img = gradient(8, 8)
    # The output is stuck on frame 0; submitting 10 more returns at once each time.
    for k in range(11):
        assert out.submit(img, k / 10)
    gate.set()
    out.close()
    assert video.closed
    # Frame 0 (taken before the jam, or dropped) and then the newest three; the rest counted.
    assert video.times[-3:] == [0.8, 0.9, 1.0]
    assert out.published == len(video.times) and out.published + out.dropped == 11


def test_an_output_that_fails_stops_with_the_reason_and_refuses_more():
    video = FakeVideo(fail_at=2)
    out = BackgroundEncoder(lambda: video, max_pending=10)
    for k in range(5):
        out.submit(gradient(8, 8), k / 10)
    deadline = time.monotonic() + 30
    while out.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert out.error == "ConnectionError: the server dropped the stream"
    assert out.published == 2
    assert not out.submit(gradient(8, 8), 1.0)
    out.close()
    assert video.closed


def test_an_output_that_cannot_open_reports_why():
    def unreachable():
        raise ConnectionRefusedError("no RTSP server at rtsp://127.0.0.1:9/dwm/x")

    out = BackgroundEncoder(unreachable)
    out.submit(gradient(8, 8), 0.0)
    out.close()
    assert "no RTSP server" in out.error


def test_packed_conditions_come_back_bit_for_bit_and_small():
    import pickle
    import zlib

    import numpy as np

    import torch

    from dwm.conditions.builder import ConditionBuilder
    from dwm.conditions.packed import PackedConditions
    from dwm.config import compose, instantiate

    cfg = compose(["world.vehicles=6"])
    world = instantiate(cfg, "world")
    ego = world.add_ego()
    for _ in range(3):
        world.tick()
    frame = ConditionBuilder.from_config(cfg).build(world.observe(ego))
    assert frame.box_images.sum() > 0 and frame.map_images.sum() > 0  # something is drawn

    packed = PackedConditions.pack(frame)
    back = pickle.loads(pickle.dumps(packed)).unpack()
    for name in ("box_images", "map_images", "camera_params"):
        assert torch.equal(getattr(back, name), getattr(frame, name)), name
    assert back.captions == frame.captions and back.sim_time == frame.sim_time
    # Scaled to [0, 1] after the uint8 crossed to the device, as numpy scales it, for every value.
    values = np.tile(np.arange(256, dtype=np.uint8), 18).reshape(3, 6, 16, 16)
    every = PackedConditions(
        zlib.compress(values.tobytes()), values.shape, frame.camera_params.numpy(), ["x"] * 3, 0.0
    ).unpack()
    expected = torch.from_numpy(values.astype(np.float32) * np.float32(1 / 255))
    assert torch.equal(torch.cat([every.box_images, every.map_images], 1), expected)
    # Far less than one byte per layout value (mostly black, compressed), never four.
    assert len(pickle.dumps(packed)) <= frame.layout.numel() // 10
