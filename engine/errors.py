"""Typed engine errors: the server maps each to an HTTP status (see server/errors.py)."""


class EngineError(RuntimeError):
    """Base class of errors raised by the engine."""


class EngineOverloadedError(EngineError):
    """The waiting queue is full; the caller should retry later (HTTP 429/503)."""


class EngineDeadError(EngineError):
    """The engine loop has died; no request can be served until restart (HTTP 503)."""


class RequestRejectedError(EngineError, ValueError):
    """The request can never be served as given (for example prompt + max_tokens beyond max_model_len)."""
