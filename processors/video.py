"""Video bytes -> sampled frames as uint8 [F, 3, h, w], with PyAV, streaming.

Two passes over the file, neither holding more than one decoded frame at a time:
1. `probe_video` demuxes the video stream without decoding (audio and other streams are skipped) and records
   every packet's timestamp and keyframe flag: an exact frame count and frame times, even at variable rate.
2. `decode_frames` decodes forward, seeking to the keyframe before a target when that skips work, converts
   only the chosen frames to RGB and resizes each one straight into the output.

Sampling covers the whole video uniformly. At constant frame rate it takes frames k·total // N, transformers'
rule. At variable frame rate it is uniform in *time*: sample k is the frame on screen at
start + k·duration / N (the last frame whose timestamp is <= that time). Rotation metadata (the display
matrix) is applied.
"""

from __future__ import annotations

import bisect
import io
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import torch

from plm_serve.processors.config import VideoSettings
from plm_serve.processors.errors import InvalidContentError, MediaDecodeError, MediaTooLargeError
from plm_serve.processors.image_decode import _reason
from plm_serve.processors.limits import MediaLimits
from plm_serve.processors.tiling import resize_frame

if TYPE_CHECKING:
    import av

# Demuxers allowed to open request bytes. Playlist and concat formats (hls, concat, ...) are excluded: they
# would make FFmpeg open other files or URLs named inside the data.
_DEMUXERS = "mov,matroska,webm,avi,mpegts,flv,ogg,mpeg,asf,gif"
_OPEN_OPTIONS = {"format_whitelist": _DEMUXERS, "protocol_whitelist": "none"}


@dataclass(slots=True)
class ProbedVideo:
    """Header facts of a video: enough to count tokens and plan the frames to decode."""

    data: bytes
    stream_index: int
    width: int
    height: int
    num_frames: int  # frames in the file (video packets)
    times: list[int]  # sorted presentation timestamps in `time_base` units; empty: no timestamps (index mode)
    keyframes: list[int]  # sorted timestamps of keyframes (empty in index mode)
    end_time: int  # timestamp just after the last frame (index mode: num_frames)
    time_base: Fraction
    average_rate: Fraction | None

    @property
    def duration_s(self) -> float | None:
        if self.times:
            return float((self.end_time - self.times[0]) * self.time_base)
        if self.average_rate:
            return float(self.num_frames / self.average_rate)
        return None


def _open(data: bytes) -> av.container.InputContainer:
    import av  # imported on first use: image-only deployments and tools need not load FFmpeg

    return av.open(io.BytesIO(data), mode="r", options=_OPEN_OPTIONS)


def probe_video(data: bytes, limits: MediaLimits) -> ProbedVideo:
    """Demux (no decoding) to count frames and collect their timestamps. Raises
    MediaDecodeError/MediaTooLargeError."""
    if len(data) == 0:
        raise MediaDecodeError("the video is empty (0 bytes)")
    if len(data) > limits.max_video_bytes:
        raise MediaTooLargeError(
            f"the video has {len(data)} bytes, over the limit of {limits.max_video_bytes}; send a shorter or "
            "lower-bitrate file"
        )
    try:
        container = _open(data)
    except Exception as e:
        raise MediaDecodeError(
            f"cannot open the video ({_reason(e)}); "
            "supported containers: MP4/MOV, WebM/MKV, AVI, MPEG-TS, FLV, Ogg"
        ) from e
    try:
        return _scan(container, data, limits)
    except (MediaDecodeError, MediaTooLargeError):
        raise
    except Exception as e:
        raise MediaDecodeError(
            f"cannot read the video ({_reason(e)}); the file may be truncated or corrupt"
        ) from e
    finally:
        container.close()


def _scan(container: av.container.InputContainer, data: bytes, limits: MediaLimits) -> ProbedVideo:
    if not container.streams.video:
        raise MediaDecodeError("the file has no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width < 1 or height < 1:
        raise MediaDecodeError(f"the video has no pixels ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise MediaTooLargeError(
            f"video frames are {width}x{height}, over the pixel limit of {limits.max_image_pixels}"
        )
    times: list[int] = []
    keyframes: list[int] = []
    count = 0
    has_times = True
    last_end = None
    for packet in container.demux(stream):
        if packet.size == 0:  # flush packets at the end of the stream
            continue
        count += 1
        if count > limits.max_video_source_frames:
            raise MediaTooLargeError(
                f"the video has more than {limits.max_video_source_frames} frames; send a shorter clip"
            )
        if packet.pts is None:
            has_times = False
            continue
        times.append(packet.pts)
        if packet.is_keyframe:
            keyframes.append(packet.pts)
        end = packet.pts + (packet.duration or 0)
        last_end = end if last_end is None else max(last_end, end)
    if count == 0:
        raise MediaDecodeError("the video has no frames")
    if stream.frames and count < stream.frames:
        # The header (e.g. an MP4 index) lists frames whose data is missing.
        raise MediaDecodeError(
            f"the video is truncated: its header lists {stream.frames} frames but only {count} are present"
        )
    if not has_times:
        times, keyframes = [], []
    times.sort()
    keyframes.sort()
    end_time = count
    if times:
        # The last frame lasts its packet duration; without one, assume the typical gap between frames.
        gap = (times[-1] - times[0]) // (len(times) - 1) if len(times) > 1 else 1
        end_time = max(last_end or 0, times[-1] + max(gap, 1))
    return ProbedVideo(
        data=data,
        stream_index=stream.index,
        width=width,
        height=height,
        num_frames=count,
        times=times,
        keyframes=keyframes,
        end_time=end_time,
        time_base=stream.time_base or Fraction(1, 1),
        average_rate=stream.average_rate,
    )


def count_frames(
    probed: ProbedVideo,
    num_frames: int | None,
    fps: float | None,
    default_frames: int,
    limits: MediaLimits,
) -> int:
    """Frames to sample: `num_frames`, or `fps` × duration, or the default; at most all frames."""
    if num_frames is not None and fps is not None:
        raise InvalidContentError("give either num_frames or fps for a video, not both")
    if num_frames is not None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise InvalidContentError(f"num_frames must be a positive integer, got {num_frames!r}")
        wanted = num_frames
    elif fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (fps > 0 and math.isfinite(fps)):
            raise InvalidContentError(f"fps must be a positive finite number, got {fps!r}")
        duration = probed.duration_s
        if duration is None:
            raise MediaDecodeError(
                "the video has no timing information to sample by fps; give num_frames instead"
            )
        exact = duration * fps  # a float: a huge fps overflows to inf here, never inside int()
        if not exact < limits.max_video_frames + 1:  # int(exact) would exceed it (NaN too)
            raise MediaTooLargeError(
                f"sampling a {duration:.3g} s video at {fps:g} fps is over the limit of "
                f"{limits.max_video_frames} frames (each costs tokens); ask for a lower fps"
            )
        wanted = max(1, int(exact))  # as transformers: int(total / video_fps * fps), at least one
    else:
        wanted = min(default_frames, limits.max_video_frames)
    if wanted > limits.max_video_frames:
        raise MediaTooLargeError(
            f"sampling {wanted} video frames is over the limit of {limits.max_video_frames} frames "
            f"(each costs tokens); ask for fewer frames or a lower fps"
        )
    return min(wanted, probed.num_frames)


def frame_targets(probed: ProbedVideo, count: int) -> list[int]:
    """Target times (time-base units; frame indices when there are no timestamps) of `count` uniform samples.

    Constant frame rate: frames k·total // count, transformers' rule, whatever the rounding of the timestamps.
    Variable frame rate: the frames on screen at start + k·duration / count.
    """
    total = probed.num_frames
    indices = [k * total // count for k in range(count)]
    if not probed.times:
        return indices
    if _constant_rate(probed.times):
        return [probed.times[i] for i in indices]
    start, span = probed.times[0], probed.end_time - probed.times[0]
    return [start + k * span // count for k in range(count)]


def _constant_rate(times: list[int]) -> bool:
    """Whether frame gaps are equal up to timestamp rounding (one tick, or 1% of the gap)."""
    if len(times) < 3:
        return True
    gaps = [b - a for a, b in itertools.pairwise(times)]
    low, high = min(gaps), max(gaps)
    return high - low <= max(1, high // 100)


class _RetryWithoutSeek(Exception):
    """A seek landed after its target (inexact index): decode again from the start without seeking."""


def decode_frames(probed: ProbedVideo, targets: list[int], settings: VideoSettings) -> torch.Tensor:
    """The frames shown at `targets` as uint8 [len(targets), 3, h, w], (h, w) = settings.output_size."""
    try:
        try:
            return _decode(probed, targets, settings, seek=bool(probed.keyframes))
        except _RetryWithoutSeek:
            return _decode(probed, targets, settings, seek=False)
    except (MediaDecodeError, MediaTooLargeError):
        raise
    except Exception as e:
        raise MediaDecodeError(
            f"cannot decode the video ({_reason(e)}); the file may be truncated or corrupt"
        ) from e


def _frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> Iterator[av.VideoFrame]:
    for packet in container.demux(stream):
        yield from packet.decode()  # the final empty packet flushes the decoder


def _decode(probed: ProbedVideo, targets: list[int], settings: VideoSettings, *, seek: bool) -> torch.Tensor:
    out_h, out_w = settings.output_size
    out = torch.empty((len(targets), 3, out_h, out_w), dtype=torch.uint8)
    container = _open(probed.data)
    try:
        stream = next(s for s in container.streams.video if s.index == probed.stream_index)
        stream.thread_type = "AUTO"  # frame/slice threads: decoding dominates for long videos
        frames = _frames(container, stream)
        use_pts = bool(probed.times)
        ordinal = -1
        prev: av.VideoFrame | None = None
        prev_time: int | None = None
        emitted: av.VideoFrame | None = None
        j = 0
        just_sought = False
        planned = -1  # the target for which a seek was last considered
        while j < len(targets):
            if seek and planned != j:
                planned = j
                # Jump to the keyframe before the target when it lies beyond the frame just decoded.
                key = probed.keyframes[max(bisect.bisect_right(probed.keyframes, targets[j]) - 1, 0)]
                if prev_time is not None and key > prev_time:
                    container.seek(key, stream=stream, backward=True)
                    frames = _frames(container, stream)
                    just_sought = True
            frame = next(frames, None)
            if frame is None:
                break
            ordinal += 1
            time = ordinal if not use_pts else frame.pts
            if time is None:
                if seek:
                    raise _RetryWithoutSeek
                raise MediaDecodeError("the video's frames have no timestamps")
            if just_sought and time > targets[j]:
                raise _RetryWithoutSeek
            just_sought = False
            while j < len(targets) and time > targets[j]:
                chosen = prev if prev is not None else frame
                _emit(out, j, chosen, emitted, settings)
                emitted = chosen
                j += 1
            prev, prev_time = frame, time
        if j < len(targets) and prev is None:
            raise MediaDecodeError("no frame of the video could be decoded")
        while j < len(targets):  # targets after the last frame's timestamp show the last frame
            assert prev is not None  # checked above
            _emit(out, j, prev, emitted, settings)
            emitted = prev
            j += 1
    finally:
        container.close()
    return out


def _emit(
    out: torch.Tensor, j: int, frame: av.VideoFrame, emitted: av.VideoFrame | None, settings: VideoSettings
) -> None:
    """Write `frame`, converted and resized, into out[j] (a repeat of the previous sample is copied)."""
    if frame is emitted and j > 0:
        out[j].copy_(out[j - 1])
        return
    out[j].copy_(frame_to_tensor(frame, settings))


def frame_to_tensor(frame: av.VideoFrame, settings: VideoSettings) -> torch.Tensor:
    """One decoded frame -> upright uint8 [3, h, w] at the processor's output size."""
    # RGBA gives the same RGB values as rgb24 (tested) and is the fast layout of the native resize kernel.
    pixels = torch.from_numpy(frame.to_ndarray(format="rgba"))  # [H, W, 4]
    turns = round(frame.rotation / 90) % 4 if frame.rotation else 0
    if turns:
        # The display matrix rotates counter-clockwise by `rotation` degrees; rot90 with k > 0 does the same.
        pixels = torch.rot90(pixels, turns, dims=(0, 1)).contiguous()
    image = pixels.unsqueeze(0).permute(0, 3, 1, 2)  # [1, 4, H, W] channels-last (batch stride = numel)
    resized = resize_frame(image, settings.height, settings.width, settings.mode)
    if settings.do_center_crop and settings.crop_height and settings.crop_width:
        resized = center_crop(resized, settings.crop_height, settings.crop_width)
    return resized


def center_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """transformers' center crop of [C, H, W]: zero-pad if the crop is larger, cut the centered window."""
    _, h, w = image.shape
    if height > h or width > w:
        pad_w, pad_h = max(width - w, 0), max(height - h, 0)
        image = torch.nn.functional.pad(image, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        _, h, w = image.shape
    top, left = int((h - height) / 2.0), int((w - width) / 2.0)
    return image[:, top : top + height, left : left + width]
