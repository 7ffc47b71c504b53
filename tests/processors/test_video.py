"""Video frame sampling and pixels against transformers (PyAV reader + PerceptionLMVideoProcessor)."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch

from plm_serve.processors import MediaLimits, VideoInput
from plm_serve.processors.config import VideoSettings
from plm_serve.processors.video import _decode, count_frames, decode_frames, frame_targets, probe_video
from tests.processors import media

LIMITS = MediaLimits()
SETTINGS = VideoSettings()


def _hf_frames(data: bytes, indices: list[int]) -> np.ndarray:
    """Frames as transformers' PyAV reader returns them for these indices."""
    from transformers.video_utils import read_video_pyav

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        frames, _ = read_video_pyav(f.name, sample_indices_fn=lambda metadata, **kw: np.array(indices))
    return frames


def _hf_video_pixels(hf_processor, frames: np.ndarray) -> torch.Tensor:
    out = hf_processor.video_processor(videos=[frames], return_tensors=None)
    return out["pixel_values_videos"][0]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x.float() - 127.5) / 127.5


def _ours(
    data: bytes, num_frames: int | None = None, fps: float | None = None
) -> tuple[list[int], torch.Tensor]:
    probe = probe_video(data, LIMITS)
    count = count_frames(probe, num_frames, fps, LIMITS.default_video_frames, LIMITS)
    targets = frame_targets(probe, count)
    return targets, decode_frames(probe, targets, SETTINGS)


def test_default_samples_32_frames_like_the_reference_index_rule(hf_processor) -> None:
    data = media.video(100, 160, 96, gop=10)
    _, ours = _ours(data)
    indices = [k * 100 // 32 for k in range(32)]  # transformers 5.x uniform rule
    theirs = _hf_video_pixels(hf_processor, _hf_frames(data, indices))
    assert ours.shape == (32, 3, 448, 448)
    assert torch.equal(_normalize(ours), theirs)


def test_short_video_uses_every_frame(hf_processor) -> None:
    data = media.video(12, 96, 64)
    _, ours = _ours(data)
    assert ours.shape[0] == 12
    assert torch.equal(_normalize(ours), _hf_video_pixels(hf_processor, media.decode_all_frames(data)))


def test_num_frames_and_fps_overrides() -> None:
    data = media.video(72, 64, 48, fps=24)  # 3 seconds
    probe = probe_video(data, LIMITS)
    assert count_frames(probe, 5, None, 32, LIMITS) == 5
    assert count_frames(probe, None, 2.0, 32, LIMITS) == 6  # int(3 s × 2 fps), as transformers
    assert count_frames(probe, None, 0.1, 32, LIMITS) == 1  # at least one frame
    assert count_frames(probe, 200 // 4, None, 32, LIMITS) == 50
    assert (
        count_frames(media_probe(media.video(10, 64, 48)), 20, None, 32, LIMITS) == 10
    )  # clamped to all frames
    targets, frames = _ours(data, num_frames=6)
    assert targets == [k * probe.end_time // 6 for k in range(6)]
    assert frames.shape == (6, 3, 448, 448)


def media_probe(data: bytes):
    return probe_video(data, LIMITS)


def test_variable_frame_rate_samples_uniformly_in_time() -> None:
    """Frames of 40 ms and 200 ms alternate in blocks: samples follow time, not frame count."""
    durations = [40] * 20 + [200] * 5 + [40] * 20 + [200] * 5  # 0.8 s, 1.0 s, 0.8 s, 1.0 s
    data = media.video(len(durations), 64, 48, frame_ms=durations)
    probe = probe_video(data, LIMITS)
    starts = np.cumsum([0, *durations[:-1]])
    tb = float(probe.time_base)
    assert probe.num_frames == 50
    assert np.allclose(
        np.array(probe.times) * tb * 1000, starts, atol=1
    )  # exact per-frame times from the demuxer
    assert probe.end_time > probe.times[-1]
    targets, frames = _ours(data, num_frames=9)
    # expected: the frame on screen at each target time
    expected = [
        int(np.searchsorted(starts, (t - probe.times[0]) * tb * 1000 + 1e-6, side="right") - 1)
        for t in targets
    ]
    assert len(set(expected)) == 9
    # the block in the middle of each frame has grey level 8·index
    levels = frames[:, :, 200:248, 200:248].float().mean(dim=(1, 2, 3))
    assert np.allclose(levels.numpy(), [(8 * i) % 256 for i in expected], atol=3), (levels, expected)


def test_audio_streams_are_ignored(hf_processor) -> None:
    data = media.video(20, 96, 64, audio=True)
    probe = probe_video(data, LIMITS)
    assert probe.num_frames == 20
    _, ours = _ours(data)
    video_only = media.decode_all_frames(data)
    assert torch.equal(_normalize(ours), _hf_video_pixels(hf_processor, video_only))


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_metadata_is_applied(rotation: int) -> None:
    plain = media.decode_all_frames(media.video(4, 128, 64))[0]
    settings = VideoSettings(height=128, width=128)
    data = media.video(4, 128, 64, rotation=rotation)
    probe = probe_video(data, LIMITS)
    frame = decode_frames(probe, frame_targets(probe, 1), settings)[0].permute(1, 2, 0).numpy()
    upright = np.rot90(plain, rotation // 90)  # display rotation is counter-clockwise
    # compare where the white top-left marker went (resize to 128² changes the pixels, not the layout)
    marker = upright[..., 0] > 250
    corner = [marker[0, 0], marker[0, -1], marker[-1, 0], marker[-1, -1]]
    ours = frame[..., 0] > 250
    assert [ours[0, 0], ours[0, -1], ours[-1, 0], ours[-1, -1]] == corner
    assert sum(corner) == 1


def test_seeking_gives_the_same_frames_as_decoding_everything() -> None:
    data = media.video(400, 64, 48, gop=12)
    probe = probe_video(data, LIMITS)
    assert len(probe.keyframes) > 10
    targets = frame_targets(probe, 16)
    assert torch.equal(
        _decode(probe, targets, SETTINGS, seek=True), _decode(probe, targets, SETTINGS, seek=False)
    )


def test_webm_without_frame_count() -> None:
    data = media.video(30, 64, 48, codec="libvpx-vp9", container="webm")
    _, frames = _ours(data, num_frames=10)
    assert frames.shape == (10, 3, 448, 448)
    levels = frames[:, :, 200:248, 200:248].float().mean(dim=(1, 2, 3))
    assert np.allclose(levels.numpy(), [8 * (k * 30 // 10) for k in range(10)], atol=4)


def test_chat_with_video_matches_reference(processor, hf_processor) -> None:
    data = media.video(10, 96, 64)
    messages = [{"role": "user", "content": [VideoInput(data), {"type": "text", "text": "What happens?"}]}]
    ours = processor.process_chat(messages)
    frames = media.decode_all_frames(data)
    conv = [
        {
            "role": "user",
            "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What happens?"}],
        }
    ]
    theirs = hf_processor.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert ours.token_ids == theirs["input_ids"][0]
    (video,) = ours.media
    assert (video.kind, video.num_tiles, video.length) == ("video", 10, 2560)
    assert set(ours.token_ids[video.offset : video.offset + video.length]) == {processor.video_token_id}
    assert torch.equal(_normalize(video.pixels), theirs["pixel_values_videos"][0])


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuvj420p", "yuv444p", "yuv422p10le", "nv12", "gray"])
def test_rgba_conversion_equals_rgb24(pix_fmt: str) -> None:
    """Frames are converted to RGBA (the resize kernel's fast layout); its RGB must equal transformers' rgb24."""
    import av

    rng = np.random.default_rng(0)
    for width, height in [(333, 187), (17, 9), (1280, 720)]:
        rgb = av.VideoFrame.from_ndarray(
            rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24"
        )
        frame = rgb.reformat(format=pix_fmt)
        assert np.array_equal(frame.to_ndarray(format="rgba")[..., :3], frame.to_ndarray(format="rgb24"))


def test_long_videos_decode_only_near_the_samples(monkeypatch) -> None:
    """With a seek index, decoding jumps to the keyframe before each sample instead of decoding everything."""
    import plm_serve.processors.video as module

    decoded = 0
    original = module._frames

    def counting(container, stream):
        nonlocal decoded
        for frame in original(container, stream):
            decoded += 1
            yield frame

    monkeypatch.setattr(module, "_frames", counting)
    data = media.video(600, 32, 32, gop=10)
    probe = probe_video(data, LIMITS)
    frames = decode_frames(probe, frame_targets(probe, 4), SETTINGS)
    levels = frames[:, :, 200:248, 200:248].float().mean(dim=(1, 2, 3))
    assert np.allclose(levels.numpy(), [(8 * k * 150) % 256 for k in range(4)], atol=4)
    assert decoded < 100  # of 600
