"""Synthetic media for the serving benchmark: photo-like JPEGs and short MP4s, made in memory from a seed.

Everything is sent inline as `data:` URLs, so a benchmark run makes no server fetch anything from anywhere.
Distinct seeds give distinct bytes (so no cache can answer for another request); equal seeds give equal bytes.
"""

from __future__ import annotations

import base64
import io

import av
import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth photo-like uint8 [H, W, 3] image: colour gradients, soft blobs and mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= max(width - 1, 1)
    y /= max(height - 1, 1)
    base = rng.uniform(20, 120, size=3)
    img = np.stack([base[0] + 120 * x, base[1] + 100 * y, base[2] + 80 * (1 - x) * y], axis=-1)
    for _ in range(5):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        img += blob * rng.uniform(-80, 80, size=3)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo(width, height, seed)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def mp4(num_frames: int, width: int, height: int, seed: int, fps: int = 4) -> bytes:
    """An MPEG-4 Part 2 video (PyAV's bundled encoder) of a photo panning sideways, `num_frames` long."""
    wide = photo(width * 2, height, seed)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            shift = (i * width) // max(num_frames, 1)
            frame = np.ascontiguousarray(wide[:, shift : shift + width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
