"""PerceptionLM in plain PyTorch: PE vision tower + projector + Llama-3 decoder, and its checkpoint loader."""

from models.attention import Attention, DenseCausalAttention, causal_sdpa
from models.config import PLMConfig
from models.demo import write_random_checkpoint
from models.loader import build_model, load_model
from models.perception_lm import PerceptionLM

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
