"""Processor settings read from a checkpoint folder, in either layout transformers writes.

transformers >= 5 writes one `processor_config.json` holding `image_processor` and `video_processor` dicts
next to `patch_size` / `pooling_ratio`; 4.5x writes `preprocessor_config.json` (image),
`video_preprocessor_config.json` and a `processor_config.json` with only `patch_size` / `pooling_ratio`.
Missing keys take the class defaults of `PerceptionLMImageProcessor` / `PerceptionLMVideoProcessor`
(docs/checkpoint-format.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from plm_serve.processors.errors import CheckpointConfigError

# PIL resample codes -> torch interpolate modes, as in transformers' `pil_torch_interpolation_mapping`
# (NEAREST is torchvision's NEAREST_EXACT). BOX (4) and HAMMING (5) have no torch kernel; transformers
# fails on them too.
RESAMPLE_MODES = {0: "nearest-exact", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """The image processor fields PLM honours. `size` is absent on purpose: the reference resizes to
    `tile_size` and never reads `size` (tested in tests/processors/test_tiling_parity.py)."""

    vision_input_type: str = "thumb+tile"
    tile_size: int = 448
    max_num_tiles: int = 36
    resample: int = 3
    do_convert_rgb: bool = True

    @property
    def tiled(self) -> bool:
        """Thumbnail + grid ("thumb+tile"); any other value means one stretched tile, as in the reference."""
        return self.vision_input_type == "thumb+tile"

    @property
    def mode(self) -> str:
        return RESAMPLE_MODES[self.resample]


@dataclass(frozen=True, slots=True)
class VideoSettings:
    """The video processor fields PLM honours: each sampled frame is stretched to `size` (then cropped)."""

    height: int = 448
    width: int = 448
    resample: int = 3
    do_convert_rgb: bool = True
    do_center_crop: bool = False
    crop_height: int | None = None
    crop_width: int | None = None
    # Checkpoint default sampling; transformers leaves these null (then MediaLimits.default_video_frames).
    num_frames: int | None = None
    fps: float | None = None
    do_sample_frames: bool | None = None

    @property
    def mode(self) -> str:
        return RESAMPLE_MODES[self.resample]

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of a processed frame."""
        if self.do_center_crop and self.crop_height and self.crop_width:
            return self.crop_height, self.crop_width
        return self.height, self.width


@dataclass(frozen=True, slots=True)
class ProcessorSettings:
    """Everything about media that a checkpoint decides."""

    image: ImageSettings
    video: VideoSettings
    patch_size: int = 14
    pooling_ratio: int = 2

    @property
    def tokens_per_tile(self) -> int:
        """Placeholder tokens per image tile: (448 / 14 / 2)² = 256 for PLM."""
        side = self.image.tile_size // self.patch_size // self.pooling_ratio
        return side * side

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.video.output_size
        return (h // self.patch_size // self.pooling_ratio) * (w // self.patch_size // self.pooling_ratio)

    def fingerprint(self) -> str:
        """A stable string of every setting that changes pixels or counts, mixed into each media hash."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dicts(
        cls, image: dict[str, Any], video: dict[str, Any], processor: dict[str, Any]
    ) -> ProcessorSettings:
        """Build from the raw JSON dicts (unknown keys are ignored, as transformers does for unused ones)."""
        return cls(
            image=_image_settings(image),
            video=_video_settings(video),
            patch_size=_positive_int(processor.get("patch_size") or 14, "patch_size"),
            pooling_ratio=_positive_int(processor.get("pooling_ratio") or 2, "pooling_ratio"),
        )


def load_processor_settings(folder: Path) -> ProcessorSettings:
    """Read the processor settings of a checkpoint folder in the 5.x or the 4.5x layout."""
    processor = _read_json(folder / "processor_config.json") or {}
    image = processor.get("image_processor")
    video = processor.get("video_processor")
    if image is None:
        image = _read_json(folder / "preprocessor_config.json")
    if video is None:
        video = _read_json(folder / "video_preprocessor_config.json")
    if image is None:
        raise CheckpointConfigError(
            f"{folder} has no image processor settings: expected processor_config.json with an "
            "'image_processor' entry, or preprocessor_config.json"
        )
    return ProcessorSettings.from_dicts(image, video or {}, processor)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointConfigError(f"{path} must hold a JSON object")
    return data


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointConfigError(f"processor setting {name} must be a positive integer, got {value!r}")
    return value


def _resample(value: Any) -> int:
    if value is None:
        return 3
    if isinstance(value, bool) or not isinstance(value, int) or value not in RESAMPLE_MODES:
        raise CheckpointConfigError(
            f"unsupported resample {value!r}: use 0 (nearest), 1 (lanczos), 2 (bilinear) or 3 (bicubic)"
        )
    return value


def _require_resize(d: dict[str, Any], kind: str) -> None:
    # Without a resize the tiles would have the image's own size; PLM's vision tower needs fixed 448² inputs.
    if d.get("do_resize", True) is False:
        raise CheckpointConfigError(
            f"{kind}: do_resize=false is not supported (the vision tower needs fixed tiles)"
        )


def _image_settings(d: dict[str, Any]) -> ImageSettings:
    _require_resize(d, "image_processor")
    return ImageSettings(
        vision_input_type=str(d.get("vision_input_type") or "thumb+tile"),
        tile_size=_positive_int(d.get("tile_size", 448), "tile_size"),
        max_num_tiles=_positive_int(d.get("max_num_tiles", 36), "max_num_tiles"),
        resample=_resample(d.get("resample")),
        do_convert_rgb=bool(d.get("do_convert_rgb", True)),
    )


def _hw(value: Any, name: str, default: tuple[int, int] | None) -> tuple[int, int] | None:
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return _positive_int(value, name), value
    if isinstance(value, dict) and set(value) >= {"height", "width"}:
        return _positive_int(value["height"], name), _positive_int(value["width"], name)
    raise CheckpointConfigError(f"video_processor {name} must be {{'height': h, 'width': w}}, got {value!r}")


def _video_settings(d: dict[str, Any]) -> VideoSettings:
    _require_resize(d, "video_processor")
    height, width = _hw(d.get("size"), "size", (448, 448))  # type: ignore[misc]
    crop = _hw(d.get("crop_size"), "crop_size", None) if d.get("do_center_crop") else None
    num_frames = d.get("num_frames")
    fps = d.get("fps")
    return VideoSettings(
        height=height,
        width=width,
        resample=_resample(d.get("resample")),
        do_convert_rgb=bool(d.get("do_convert_rgb", True)),
        do_center_crop=crop is not None,
        crop_height=crop[0] if crop else None,
        crop_width=crop[1] if crop else None,
        num_frames=_positive_int(num_frames, "num_frames") if num_frames is not None else None,
        fps=float(fps) if fps is not None else None,
        do_sample_frames=d.get("do_sample_frames"),
    )
