"""The continuous-batching engine. The server imports only the names below."""

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.core import EngineCore, EngineStats
from engine.demo import write_demo_model
from engine.errors import EngineDeadError, EngineError, EngineOverloadedError, RequestRejectedError
from engine.request import EngineRequest, FinishReason, MMInput, SamplingParams, StepOutput, TokenLogprob

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
    "TokenLogprob",
    "write_demo_model",
]
