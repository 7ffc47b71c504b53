"""The continuous-batching engine. The server imports only the names below."""

from plm_serve.engine.async_engine import AsyncEngine
from plm_serve.engine.config import EngineConfig
from plm_serve.engine.core import EngineCore, EngineStats
from plm_serve.engine.demo import write_demo_model
from plm_serve.engine.errors import EngineDeadError, EngineError, EngineOverloadedError, RequestRejectedError
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

__all__ = [
    "AsyncEngine",
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
