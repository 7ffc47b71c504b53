"""Tiny random-weight PerceptionLM checkpoints built with transformers + timm: the reference we compare against.

Nothing here is downloaded: timm builds the vision tower with `pretrained=False`, and the Llama-3 tokenizer comes
from the `llama-models` package (docs/checkpoint-format.md, the demo checkpoint). Checkpoints are saved with `save_pretrained` into a cache
folder outside the repository, keyed by the variant and the transformers version, so the slow build runs once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

IMAGE_TOKEN_ID = 128002
VIDEO_TOKEN_ID = 128003

# The PLM chat template (HF convert_perception_lm_weights_to_hf.py CHAT_TEMPLATE); docs/checkpoint-format.md describes it.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}"
    "    {%- set system_message = 'You are a helpful language and vision assistant. You are able to understand the "
    "visual content that the user provides, and assist the user with a variety of tasks using natural language.' %}"
    "{%- endif -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- system_message }}"
    "{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<|image|>' }}"
    "{%- endfor %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<|video|>' }}"
    "{%- endfor %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{- content['text'] | trim }}"
    "{%- endfor %}"
    "{{'<|eot_id|>'}}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


@dataclass(frozen=True)
class Variant:
    """A tiny PLM. `family` "L" = PE-L tower (CLS, grid offset 1) as in 1B/3B; "G" = PE-G (no CLS) as in 8B."""

    family: str = "L"
    tied: bool = True
    llama3_rope: bool = True
    vision_width: int = 64
    vision_depth: int = 2
    vision_heads: int = 4  # head_dim 16 -> 4 RoPE bands
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    max_num_tiles: int = 4  # small, so tests stay fast on 2 cores
    seed: int = 0


PE_L = Variant()
PE_G = Variant(family="G", tied=False, llama3_rope=False, seed=1)


def cache_root() -> Path:
    root = os.environ.get("PLM_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "plm-serve-tests"
    )
    return Path(root)


def llama3_tiktoken_file() -> Path:
    from plm_serve.processors.tiktoken_convert import llama3_tiktoken_file as locate

    return locate()


def special_tokens() -> list[str]:
    """The 256 added tokens 128000..128255 in id order (docs/checkpoint-format.md)."""
    named = {
        0: "<|begin_of_text|>",
        1: "<|end_of_text|>",
        2: "<|image|>",
        3: "<|video|>",
        4: "<|reserved_special_token_2|>",
        5: "<|reserved_special_token_3|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        8: "<|reserved_special_token_4|>",
        9: "<|eot_id|>",
    }
    return [named.get(i, f"<|reserved_special_token_{i - 5}|>") for i in range(256)]


@functools.lru_cache(maxsize=1)
def build_hf_tokenizer():
    """The PLM tokenizer as transformers' converter makes it: 128256 tokens, BOS prepended by the post-processor."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(llama3_tiktoken_file()), extra_special_tokens=special_tokens()
    ).converted()
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", 128000)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        model_max_length=11520,
        extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
    )


def build_hf_processor(max_num_tiles: int = 4, vision_input_type: str = "thumb+tile"):
    from transformers import PerceptionLMImageProcessor, PerceptionLMProcessor, PerceptionLMVideoProcessor

    image_processor = PerceptionLMImageProcessor(
        vision_input_type=vision_input_type,
        tile_size=448,
        max_num_tiles=max_num_tiles,
        size={"height": 448, "width": 448},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = PerceptionLMVideoProcessor(size={"height": 448, "width": 448})
    return PerceptionLMProcessor(
        video_processor=video_processor,
        image_processor=image_processor,
        tokenizer=build_hf_tokenizer(),
        patch_size=14,
        pooling_ratio=2,
        chat_template=CHAT_TEMPLATE,
    )


def build_hf_config(v: Variant):
    from transformers import PerceptionLMConfig

    arch = "vit_pe_core_large_patch14_336" if v.family == "L" else "vit_pe_core_gigantic_patch14_448"
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if v.llama3_rope:
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    text_config = {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": v.hidden,
        "num_hidden_layers": v.layers,
        "num_attention_heads": v.heads,
        "num_key_value_heads": v.kv_heads,
        "intermediate_size": v.intermediate,
        "max_position_embeddings": 11520,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": v.tied,
        "rope_parameters": rope,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128009],
    }
    vision_config = {
        "model_type": "timm_wrapper",
        "architecture": arch,
        "model_args": {
            "embed_dim": v.vision_width,
            "depth": v.vision_depth,
            "num_heads": v.vision_heads,
            "img_size": (448, 448),
            "global_pool": "",
            "use_post_transformer_norm": False,
            "init_values": 0.1,
            "ref_feat_shape": (32, 32),
        },
    }
    return PerceptionLMConfig(
        vision_config=vision_config,
        text_config=text_config,
        projector_pooling_ratio=2,
        vision_use_cls_token=v.family == "L",
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        tie_word_embeddings=v.tied,
    )


def build_hf_model(v: Variant):
    """A random-weight `PerceptionLMForConditionalGeneration` in fp32, eval mode.

    Weights are drawn with a fixed seed; LayerScale gammas and norms are randomized too, so that every parameter
    matters for the parity tests (a zero or one everywhere would hide a missing term).
    """
    from transformers import PerceptionLMForConditionalGeneration

    torch.manual_seed(v.seed)
    model = PerceptionLMForConditionalGeneration(build_hf_config(v)).eval()
    gen = torch.Generator().manual_seed(v.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lm_head.weight") and v.tied:
                continue
            if p.dim() == 1 and ("norm" in name or "gamma" in name):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model


def _key(v: Variant) -> str:
    import transformers

    blob = json.dumps(
        {"variant": asdict(v), "transformers": transformers.__version__, "format": 2}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tiny_checkpoint(v: Variant = PE_L) -> Path:
    """Path of a complete saved checkpoint folder (model, tokenizer, processor, chat template) for `v`."""
    folder = cache_root() / f"tiny-{v.family}-{_key(v)}"
    if (folder / "done").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = build_hf_model(v)
    model.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    build_hf_processor(v.max_num_tiles).save_pretrained(tmp)
    (tmp / "done").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_hf_model(path: Path):
    from transformers import PerceptionLMForConditionalGeneration

    return PerceptionLMForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def load_hf_processor(path: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)
