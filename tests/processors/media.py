"""Synthetic test media: photo-like images in every format the processors accept, and small videos (PyAV)."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like uint8 [H, W, 3] image: gradients, a few soft blobs, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= max(width - 1, 1)
    y /= max(height - 1, 1)
    img = np.stack([200 * x + 30, 180 * y + 40, 120 * (1 - x) * y + 60], axis=-1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        img += blob * rng.uniform(-80, 80, size=3)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str, **save_args) -> bytes:
    """Encode with PIL; `fmt` is a PIL format name ("JPEG", "PNG", ...)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **save_args)
    return buf.getvalue()


def jpeg(width: int, height: int, seed: int = 0, quality: int = 90, **save_args) -> bytes:
    return encode(photo(width, height, seed), "JPEG", quality=quality, **save_args)


def png(width: int, height: int, seed: int = 0) -> bytes:
    return encode(photo(width, height, seed), "PNG")


def index_frame(i: int, width: int, height: int) -> np.ndarray:
    """Frame `i` of a test video: a moving gradient plus a flat block whose grey level encodes i (i * 8)."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(x * 255 // max(width - 1, 1) + 5 * i) % 256, (y * 2 + i) % 256, np.full_like(x, 90)], -1)
    img = img.astype(np.uint8)
    img[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = (i * 8) % 256
    img[: max(height // 8, 1), : max(width // 8, 1)] = 255  # top-left marker, to see rotations
    return img


def video(
    num_frames: int = 48,
    width: int = 160,
    height: int = 96,
    fps: int = 24,
    *,
    codec: str = "libx264",
    container: str = "mp4",
    gop: int | None = None,
    rotation: int | None = None,
    audio: bool = False,
    frame_ms: list[int] | None = None,
) -> bytes:
    """Encode `num_frames` index frames. `frame_ms` gives per-frame durations (variable frame rate)."""
    import av  # lazily: the image tests also run where PyAV is missing (the GPU machine)

    buf = io.BytesIO()
    out = av.open(buf, "w", format=container)
    stream = out.add_stream(codec, rate=fps)
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "18"} if codec == "libx264" else {}
    if gop:
        stream.codec_context.gop_size = gop
    if rotation is not None:
        stream.set_display_rotation(rotation)
    if frame_ms is not None:
        stream.codec_context.time_base = Fraction(1, 1000)
    sound = out.add_stream("aac", rate=16000) if audio else None
    t = 0
    for i in range(num_frames):
        frame = av.VideoFrame.from_ndarray(index_frame(i, width, height), format="rgb24")
        if frame_ms is not None:
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            t += frame_ms[i]
        for packet in stream.encode(frame):
            out.mux(packet)
        if sound is not None and i % 2 == 0:
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            chunk.sample_rate = 16000
            for packet in sound.encode(chunk):
                out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    if sound is not None:
        for packet in sound.encode():
            out.mux(packet)
    out.close()
    return buf.getvalue()


def decode_all_frames(data: bytes) -> np.ndarray:
    """Every frame as rgb24 [F, H, W, 3], the way transformers' PyAV reader decodes them."""
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
