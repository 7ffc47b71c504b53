"""Offline batch inference, like vLLM's `LLM`: no server, no event loop."""

from plm_serve.offline.llm import LLM, CompletionOutput, RequestOutput

__all__ = ["LLM", "CompletionOutput", "RequestOutput"]
