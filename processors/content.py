"""The media parts of a chat message, as the server hands them over (already fetched as bytes)."""

from __future__ import annotations

from dataclasses import dataclass

DETAIL_VALUES = ("auto", "low", "high")


@dataclass(frozen=True, slots=True, repr=False)
class ImageInput:
    """An image part. `detail`: "low" -> one 448² tile (256 tokens); "high"/"auto" -> thumbnail + tiles.

    `max_num_tiles` lowers the checkpoint's maximum number of grid tiles for this image (it never raises it).
    """

    data: bytes
    detail: str = "auto"
    max_num_tiles: int | None = None

    def __repr__(self) -> str:  # never dump megabytes of bytes into logs or error messages
        options = f"detail={self.detail!r}, max_num_tiles={self.max_num_tiles!r}"
        return f"ImageInput(<{len(self.data)} bytes>, {options})"


@dataclass(frozen=True, slots=True, repr=False)
class VideoInput:
    """A video part. By default frames are sampled uniformly over the whole video
    (`MediaLimits.default_video_frames`, or all frames when there are fewer); `num_frames` or `fps` (not both)
    override that.
    """

    data: bytes
    num_frames: int | None = None
    fps: float | None = None

    def __repr__(self) -> str:
        return f"VideoInput(<{len(self.data)} bytes>, num_frames={self.num_frames!r}, fps={self.fps!r})"
