"""Every bad input raises its typed error, with a `param` pointing into the request; nothing else escapes.

The broken-file corpus is generated here: empty, random, truncated, zero-sized, bombs, wrong formats, files
naming other files (HLS playlists), oversized inputs, and random byte flips of valid files.
"""

from __future__ import annotations

import contextlib
import struct
import tempfile
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from plm_serve.processors import (
    ImageInput,
    InvalidContentError,
    MediaDecodeError,
    MediaLimits,
    MediaTooLargeError,
    Processor,
    ProcessorError,
    VideoInput,
)
from tests.processors import media

RNG = np.random.default_rng(0)
JPEG = media.jpeg(320, 240)
PNG = media.png(200, 100)
MP4 = media.video(30, 64, 48)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width×height but holds almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _gif_header(width: int, height: int) -> bytes:
    return (
        b"GIF89a"
        + struct.pack("<HH", width, height)
        + b"\x00\x00\x00"
        + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    )


def _faststart_mp4() -> bytes:
    """An MP4 with its index first: cutting it leaves a valid header listing missing frames."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.mp4"
        out = av.open(str(path), "w", format="mp4", options={"movflags": "faststart"})
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(48):
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(media.index_frame(i, 64, 48), format="rgb24")
            ):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        out.close()
        return path.read_bytes()


def _audio_only() -> bytes:
    import io

    buf = io.BytesIO()
    out = av.open(buf, "w", format="mp4")
    stream = out.add_stream("aac", rate=16000)
    for _ in range(8):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return buf.getvalue()


BROKEN_IMAGES = {
    "empty": (b"", MediaDecodeError),
    "random bytes": (RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes(), MediaDecodeError),
    "text": (b"definitely not an image", MediaDecodeError),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', MediaDecodeError),
    "truncated jpeg": (JPEG[: len(JPEG) // 2], MediaDecodeError),
    "jpeg header only": (JPEG[:200], MediaDecodeError),
    "truncated png": (PNG[: len(PNG) // 2], MediaDecodeError),
    "png zero width": (_png_header(0, 10), MediaDecodeError),
    "png zero height": (_png_header(10, 0), MediaDecodeError),
    "png pixel bomb": (_png_header(20000, 20000), MediaTooLargeError),
    "gif pixel bomb": (_gif_header(65535, 65535), MediaTooLargeError),
    "png data missing": (_png_header(64, 64), MediaDecodeError),
    "ico (format not accepted)": (media.encode(Image.new("RGB", (8, 8)), "ICO"), MediaDecodeError),
    "video as image": (MP4, MediaDecodeError),
}

BROKEN_VIDEOS = {
    "empty": (b"", MediaDecodeError),
    "random bytes": (RNG.integers(0, 256, 8192, dtype=np.uint8).tobytes(), MediaDecodeError),
    "truncated mp4 (index at the end)": (MP4[: int(len(MP4) * 0.6)], MediaDecodeError),
    "truncated mp4 (index first)": (_faststart_mp4()[:-2000], MediaDecodeError),
    "image as video": (JPEG, MediaDecodeError),
    "hls playlist naming a local file": (
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
        MediaDecodeError,
    ),
    "ffconcat script": (b"ffconcat version 1.0\nfile /etc/passwd\n", MediaDecodeError),
    "audio only": (_audio_only(), MediaDecodeError),
}


def _chat(processor: Processor, part, max_prompt_tokens: int | None = None):
    return processor.process_chat(
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}, part]}],
        max_prompt_tokens=max_prompt_tokens,
    )


@pytest.mark.parametrize("name", sorted(BROKEN_IMAGES))
def test_broken_images(processor, name: str) -> None:
    data, error = BROKEN_IMAGES[name]
    with pytest.raises(error) as info:
        _chat(processor, ImageInput(data))
    assert info.value.param == "messages[0].content[1]"
    assert str(info.value)
    assert "0x" not in str(info.value) and "<_io." not in str(info.value)  # no Python object reprs for users


@pytest.mark.parametrize("name", sorted(BROKEN_VIDEOS))
def test_broken_videos(processor, name: str) -> None:
    data, error = BROKEN_VIDEOS[name]
    with pytest.raises(error) as info:
        _chat(processor, VideoInput(data))
    assert info.value.param == "messages[0].content[1]"
    assert "<none>" not in str(info.value)


@pytest.mark.parametrize("kind", ["jpeg", "png", "mp4"])
def test_byte_flips_raise_only_typed_errors(processor, kind: str) -> None:
    """Corrupt bytes anywhere: either it still decodes (codecs conceal errors) or a ProcessorError."""
    original = {"jpeg": JPEG, "png": PNG, "mp4": MP4}[kind]
    rng = np.random.default_rng(1)
    for _ in range(12):
        data = bytearray(original)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 40))):
            data[pos] = int(rng.integers(0, 256))
        part = (
            VideoInput(bytes(data), num_frames=4) if kind == "mp4" else ImageInput(bytes(data), detail="low")
        )
        with contextlib.suppress(ProcessorError):
            _chat(processor, part)


def test_limits(ckpt_l) -> None:
    tight = Processor.from_pretrained(
        ckpt_l,
        limits=MediaLimits(
            max_image_bytes=1000, max_image_pixels=10_000, max_video_bytes=4000, max_video_frames=4,
            default_video_frames=4, max_media_per_request=2, max_video_source_frames=20,
        ),
    )  # fmt: skip
    cases = [
        (ImageInput(JPEG), "bytes, over the limit of 1000"),
        (
            ImageInput(media.encode(Image.new("1", (200, 200)), "PNG")),
            "40000 pixels, over the limit of 10000",
        ),
        (VideoInput(MP4), "bytes, over the limit of 4000"),
        (VideoInput(media.video(30, 16, 16)), "more than 20 frames"),  # ~3 kB, but 30 frames in the file
        (VideoInput(media.video(10, 16, 16), num_frames=5), "5 video frames is over the limit of 4"),
    ]
    for part, match in cases:
        with pytest.raises(MediaTooLargeError, match=match) as info:
            _chat(tight, part)
        assert info.value.param == "messages[0].content[1]"
    tiny_image = ImageInput(media.encode(Image.new("L", (20, 20)), "PNG"))
    with pytest.raises(MediaTooLargeError) as info:
        tight.process_chat([{"role": "user", "content": [tiny_image, tiny_image, tiny_image]}])
    assert info.value.param == "messages"


def test_frame_limits(processor) -> None:
    with pytest.raises(MediaTooLargeError, match="over the limit of 64 frames"):
        _chat(processor, VideoInput(MP4, num_frames=65))
    long_video = media.video(200, 16, 16, fps=50)  # 4 s
    with pytest.raises(MediaTooLargeError, match="fps"):
        _chat(processor, VideoInput(long_video, fps=30.0))  # 120 frames
    assert _chat(processor, VideoInput(long_video, fps=2.0)).media[0].num_tiles == 8


@pytest.mark.parametrize(
    ("part", "match"),
    [
        (VideoInput(MP4, num_frames=0), "num_frames"),
        (VideoInput(MP4, num_frames=2, fps=1.0), "either num_frames or fps"),
        (VideoInput(MP4, fps=-1.0), "fps"),
        (ImageInput(JPEG, detail="ultra"), "detail"),
        (ImageInput(JPEG, max_num_tiles=0), "max_num_tiles"),
        (ImageInput("not bytes"), "bytes"),  # type: ignore[arg-type]
        (
            {"type": "image_url", "image_url": {"url": "http://x"}},
            "unsupported content part type 'image_url'",
        ),
        ({"type": "input_audio"}, "unsupported content part type"),
        ({"type": "text", "text": 42}, "string 'text'"),
        ({"type": "text", "text": "sneaky <|image|> placeholder"}, "placeholder"),
        ("a bare string part", "content part"),
    ],
)
def test_invalid_parts(processor, part, match: str) -> None:
    with pytest.raises(InvalidContentError, match=match) as info:
        _chat(processor, part)
    assert info.value.param.startswith("messages[0].content[1]")


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ("hello", "messages"),
        ([{"role": "user", "content": "ok"}, "not a dict"], "messages[1]"),
        ([{"role": "function", "content": "x"}], "messages[0].role"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        (
            [{"role": "system", "content": [ImageInput(JPEG)]}, {"role": "user", "content": "x"}],
            "messages[0].content",
        ),
        ([{"role": "user", "content": "the <|video|> token"}], "messages[0].content"),
    ],
)
def test_invalid_messages(processor, messages, param: str) -> None:
    with pytest.raises(InvalidContentError) as info:
        processor.process_chat(messages)
    assert info.value.param == param


def test_text_prompt_with_placeholder_is_rejected(processor) -> None:
    with pytest.raises(InvalidContentError) as info:
        processor.process_prompt("look: <|image|>")
    assert info.value.param == "prompt"
