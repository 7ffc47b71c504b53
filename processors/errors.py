"""Typed errors for everything a request can get wrong in preprocessing.

Every error carries `param`, the path of the offending input in the request (e.g. "messages[1].content[0]"),
so the server can answer with an OpenAI-style error envelope that points at it. All of them are `ValueError`s:
they describe bad input, never a bug or a broken checkpoint (see `CheckpointConfigError` for that).
"""

from __future__ import annotations


class ProcessorError(ValueError):
    """Base class: an input the processors cannot turn into a prompt. `param` locates it in the request."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def with_param(self, param: str) -> ProcessorError:
        """Set `param` unless known (inner helpers do not know where their input sits); returns self."""
        if self.param is None:
            self.param = param
        return self


class InvalidContentError(ProcessorError):
    """Bad message structure: unknown role or part type, wrong field types, bad per-part options."""


class MediaDecodeError(ProcessorError):
    """Media bytes that cannot be decoded: unknown format, corrupt or truncated data, zero-sized media."""


class MediaTooLargeError(ProcessorError):
    """Media over a configured limit (bytes, pixels, frames, number of media items); the server answers
    413."""


class PromptTooLongError(ProcessorError):
    """The prompt has more tokens than allowed. `num_tokens` is its length, `limit` the maximum."""

    def __init__(self, message: str, *, num_tokens: int, limit: int, param: str | None = "messages") -> None:
        super().__init__(message, param=param)
        self.num_tokens = num_tokens
        self.limit = limit


class CheckpointConfigError(ValueError):
    """A checkpoint's tokenizer or processor files are missing, malformed or ask for something unsupported.

    Raised while loading (`Processor.from_pretrained`), never for a request: it is an operator error, not a
    4xx.
    """
