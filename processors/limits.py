"""Operator limits on request media, checked before any expensive decoding."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MediaLimits:
    """Per-request media limits. Exceeding one raises `MediaTooLargeError` (HTTP 413).

    The pixel limit is checked on the image header, before decoding: it is the decompression-bomb guard (like
    PIL's `MAX_IMAGE_PIXELS`, but explicit and per server). Video frame limits count *sampled* frames, each of
    which costs 256 prompt tokens; `max_video_source_frames` bounds the frames of the file itself, which
    bounds decoding work.
    """

    max_image_bytes: int = 20 * MiB
    """Largest image file in bytes (413 beyond)."""

    max_image_pixels: int = 50_000_000
    """Largest image (and video frame) in pixels, checked on the header: the decompression-bomb guard."""

    max_video_bytes: int = 64 * MiB
    """Largest video file in bytes (413 beyond). Base64 inflates it by 4/3 inside a JSON body."""

    max_video_frames: int = 64
    """Most sampled frames per video (each costs one tile's worth of prompt tokens, 256 for PLM)."""

    default_video_frames: int = 32
    """Frames sampled from a video when the request does not say."""

    max_media_per_request: int = 8
    """Most images and videos in one request."""

    max_video_source_frames: int = 200_000
    """Most frames in the video file itself (1 hour at 30 fps is 108k): bounds the demux scan and, for files
    without a usable seek index, the number of frames decoded."""

    def __post_init__(self) -> None:
        for name in (
            "max_image_bytes",
            "max_image_pixels",
            "max_video_bytes",
            "max_video_frames",
            "default_video_frames",
            "max_media_per_request",
            "max_video_source_frames",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"MediaLimits.{name} must be at least 1")
        if self.default_video_frames > self.max_video_frames:
            raise ValueError("MediaLimits.default_video_frames must not exceed max_video_frames")
