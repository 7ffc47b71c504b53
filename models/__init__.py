"""PerceptionLM in plain PyTorch: PE vision tower + projector + Llama-3 decoder, and its checkpoint loader."""

from plm_serve.models.attention import Attention, DenseCausalAttention, causal_sdpa
from plm_serve.models.config import PLMConfig
from plm_serve.models.demo import write_random_checkpoint
from plm_serve.models.loader import build_model, load_model
from plm_serve.models.perception_lm import PerceptionLM

__all__ = [
    "Attention",
    "DenseCausalAttention",
    "PLMConfig",
    "PerceptionLM",
    "build_model",
    "causal_sdpa",
    "load_model",
    "write_random_checkpoint",
]
