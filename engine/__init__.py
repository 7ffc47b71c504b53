"""The continuous-batching engine. The server and the offline API import only the names below.

The names load on first use (PEP 562), so `from plm_serve.engine.config import EngineConfig` (the CLI's
`--help`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plm_serve.engine.async_engine import AsyncEngine
    from plm_serve.engine.client import EngineClient
    from plm_serve.engine.config import EngineConfig
    from plm_serve.engine.core import EngineCore, EngineStats
    from plm_serve.engine.demo import write_demo_model
    from plm_serve.engine.errors import (
        EngineDeadError,
        EngineError,
        EngineOverloadedError,
        RequestRejectedError,
    )
    from plm_serve.engine.request import (
        EngineRequest,
        FinishReason,
        MMInput,
        SamplingParams,
        StepOutput,
        StructuredOutputParams,
        TokenLogprob,
    )
    from plm_serve.engine.structured_output import StructuredOutputError, StructuredOutputUnavailable

_EXPORTS = {
    "AsyncEngine": "async_engine",
    "EngineClient": "client",
    "EngineConfig": "config",
    "EngineCore": "core",
    "EngineStats": "core",
    "write_demo_model": "demo",
    "EngineDeadError": "errors",
    "EngineError": "errors",
    "EngineOverloadedError": "errors",
    "RequestRejectedError": "errors",
    "EngineRequest": "request",
    "FinishReason": "request",
    "MMInput": "request",
    "SamplingParams": "request",
    "StepOutput": "request",
    "StructuredOutputParams": "request",
    "StructuredOutputError": "structured_output",
    "StructuredOutputUnavailable": "structured_output",
    "TokenLogprob": "request",
}
__all__ = [
    "AsyncEngine",
    "EngineClient",
    "EngineConfig",
    "EngineCore",
    "EngineDeadError",
    "EngineError",
    "EngineOverloadedError",
    "EngineRequest",
    "EngineStats",
    "FinishReason",
    "MMInput",
    "RequestRejectedError",
    "SamplingParams",
    "StepOutput",
    "StructuredOutputError",
    "StructuredOutputParams",
    "StructuredOutputUnavailable",
    "TokenLogprob",
    "write_demo_model",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
