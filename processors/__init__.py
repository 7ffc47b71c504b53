"""Request preprocessing for PerceptionLM: chat template, tokenizer, image tiling and video frame sampling.

A leaf package: it never imports `engine`, `models` or `server`. Pixels leave it as uint8 tiles; the model
normalizes.

The names load on first use (PEP 562): importing `plm_serve.processors.limits` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plm_serve.processors.assets import write_processor_files
    from plm_serve.processors.byte_level import TokenBytes
    from plm_serve.processors.content import ImageInput, VideoInput
    from plm_serve.processors.errors import (
        CheckpointConfigError,
        InvalidContentError,
        MediaDecodeError,
        MediaTooLargeError,
        ProcessorError,
        PromptTooLongError,
    )
    from plm_serve.processors.limits import MediaLimits
    from plm_serve.processors.processor import ProcessedMedia, ProcessedPrompt, Processor

_EXPORTS = {
    "write_processor_files": "assets",
    "TokenBytes": "byte_level",
    "ImageInput": "content",
    "VideoInput": "content",
    "CheckpointConfigError": "errors",
    "InvalidContentError": "errors",
    "MediaDecodeError": "errors",
    "MediaTooLargeError": "errors",
    "ProcessorError": "errors",
    "PromptTooLongError": "errors",
    "MediaLimits": "limits",
    "ProcessedMedia": "processor",
    "ProcessedPrompt": "processor",
    "Processor": "processor",
}
__all__ = [
    "CheckpointConfigError",
    "ImageInput",
    "InvalidContentError",
    "MediaDecodeError",
    "MediaLimits",
    "MediaTooLargeError",
    "ProcessedMedia",
    "ProcessedPrompt",
    "Processor",
    "ProcessorError",
    "PromptTooLongError",
    "TokenBytes",
    "VideoInput",
    "write_processor_files",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
