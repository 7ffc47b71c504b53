"""Request preprocessing for PerceptionLM: chat template, tokenizer, image tiling and video frame sampling.

A leaf package: it never imports `engine`, `models` or `server`. Pixels leave it as uint8 tiles; the model
normalizes.
"""

from plm_serve.processors.assets import write_processor_files
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
    "VideoInput",
    "write_processor_files",
]
