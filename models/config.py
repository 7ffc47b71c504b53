"""PerceptionLM configuration, read from a transformers checkpoint folder (`config.json` and friends).

`config.json` is read exactly as transformers writes it, in both the 4.x form (`text_config.rope_theta` +
`rope_scaling`) and the 5.x form (`text_config.rope_parameters`). Missing keys take the defaults of the
transformers classes (`LlamaConfig`, `PerceptionLMConfig`). The vision tower is described by a timm
architecture name plus `model_args` overrides (docs/checkpoint-format.md); the arch defaults live in
`VISION_ARCHS` below. EOS ids come from `generation_config.json` (falling back to the text config), and the
pixel normalization from the processor files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plm_serve import configs

# timm defaults of the two PE towers PLM ships, for whatever `model_args` does not override
# (timm/models/eva.py `vit_pe_core_large_patch14_336`, `vit_pe_core_gigantic_patch14_448`). PLM-1B/3B use the
# first (CLS token, RoPE grid offset 1), PLM-8B the second (no CLS, offset 0); both are truncated by `depth`.
VISION_ARCHS: dict[str, dict[str, Any]] = {
    "vit_pe_core_large_patch14_336": {
        "img_size": 336,
        "patch_size": 14,
        "embed_dim": 1024,
        "depth": 24,
        "num_heads": 16,
        "mlp_ratio": 4.0,
        "class_token": True,
        "ref_feat_shape": (24, 24),
        "rope_grid_offset": 1.0,
        "global_pool": "map",  # PLM overrides it with "" (an attention-pool head would be dead weight)
    },
    "vit_pe_core_gigantic_patch14_448": {
        "img_size": 448,
        "patch_size": 14,
        "embed_dim": 1536,
        "depth": 50,
        "num_heads": 16,
        "mlp_ratio": 8960 / 1536,
        "class_token": False,
        "ref_feat_shape": (32, 32),
        "rope_grid_offset": 0.0,
        "global_pool": "map",
    },
}

# model_args keys we read (values other than PLM's are honoured or rejected in `VisionConfig.from_timm`), and
# keys that cannot change inference (dropouts, classifier size: TimmWrapperModel forces num_classes=0).
_VISION_KEYS = {
    "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "class_token", "ref_feat_shape",
    "rope_grid_offset", "rope_grid_indexing", "rope_temperature", "init_values", "qkv_bias", "global_pool",
    "use_pre_transformer_norm", "use_post_transformer_norm", "use_fc_norm", "dynamic_img_size",
}  # fmt: skip
_VISION_IGNORED = {
    "num_classes", "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
    "drop_path_rate", "pretrained_cfg", "pretrained_cfg_overlay",
}  # fmt: skip


def _pair(v: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


@dataclass(frozen=True)
class VisionConfig:
    """The Perception Encoder ViT (timm Eva) as PLM uses it: patch tokens of one square tile, no head."""

    architecture: str
    img_size: int = 448
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 23
    num_heads: int = 16
    mlp_hidden: int = 4096  # timm: int(embed_dim * mlp_ratio)
    class_token: bool = True
    ref_feat_shape: tuple[int, int] | None = (32, 32)  # RoPE coordinates are rescaled to this grid
    rope_grid_offset: float = 1.0
    rope_temperature: float = 10000.0
    init_values: float | None = 0.1  # LayerScale; None = no gamma_1/gamma_2
    qkv_bias: bool = True
    pre_norm: bool = True  # `norm_pre` after the position embedding; it also removes the patch-embed bias
    post_norm: bool = False  # a final `norm` after the last block
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    @classmethod
    def from_timm(cls, architecture: str, model_args: dict[str, Any] | None = None) -> VisionConfig:
        """Resolve `architecture` + `model_args` as `timm.create_model(arch, num_classes=0, **model_args)`."""
        if architecture not in VISION_ARCHS:
            raise ValueError(
                f"unknown vision architecture {architecture!r}; supported: {', '.join(sorted(VISION_ARCHS))}"
            )
        args = dict(model_args or {})
        unknown = set(args) - _VISION_KEYS - _VISION_IGNORED
        if unknown:
            raise ValueError(f"unsupported vision model_args for {architecture}: {sorted(unknown)}")
        a = {**VISION_ARCHS[architecture], **args}
        if a["global_pool"] != "":
            raise ValueError(
                f"vision global_pool must be '' (PLM uses patch tokens), got {a['global_pool']!r}"
            )
        if a.get("use_fc_norm"):
            raise ValueError("vision use_fc_norm=True is not supported (PLM has no pooling head)")
        if a.get("rope_grid_indexing", "xy") != "xy":
            raise ValueError("only rope_grid_indexing='xy' is supported (the PE towers)")
        img_h, img_w = _pair(a["img_size"])
        patch_h, patch_w = _pair(a["patch_size"])
        if img_h != img_w or patch_h != patch_w:
            raise ValueError(f"square tiles and patches expected, got img_size {a['img_size']}")
        # timm: the post norm defaults to on unless fc_norm is used, and fc_norm is off without 'avg' pooling
        post = a.get("use_post_transformer_norm")
        ref = a.get("ref_feat_shape")
        return cls(
            architecture=architecture,
            img_size=img_h,
            patch_size=patch_h,
            embed_dim=int(a["embed_dim"]),
            depth=int(a["depth"]),
            num_heads=int(a["num_heads"]),
            mlp_hidden=int(a["embed_dim"] * a["mlp_ratio"]),
            class_token=bool(a["class_token"]),
            ref_feat_shape=_pair(ref) if ref is not None else None,
            rope_grid_offset=float(a["rope_grid_offset"]),
            rope_temperature=float(a.get("rope_temperature", 10000.0)),
            init_values=a.get("init_values"),
            qkv_bias=bool(a.get("qkv_bias", True)),
            pre_norm=bool(a.get("use_pre_transformer_norm", True)),
            post_norm=True if post is None else bool(post),
        )


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 RoPE frequency scaling (transformers `rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class TextConfig:
    """The Llama decoder; field names and defaults follow transformers' `LlamaConfig`."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # None = plain RoPE
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"text_config.model_type must be 'llama', got {d.get('model_type')!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"text_config.hidden_act must be 'silu', got {d.get('hidden_act')!r}")
        hidden = int(d.get("hidden_size", 4096))
        heads = int(d.get("num_attention_heads", 32))
        max_pos = int(d.get("max_position_embeddings", 2048))
        # 5.x: everything in `rope_parameters`; 4.x: `rope_theta` at the top and an optional `rope_scaling`
        # dict whose type key is `rope_type` (or the older `type`).
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope.get("original_max_position_embeddings", max_pos)),
            )
        elif rope_type != "default":
            raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        return cls(
            vocab_size=int(d.get("vocab_size", 32000)),
            hidden_size=hidden,
            intermediate_size=int(d.get("intermediate_size", 11008)),
            num_hidden_layers=int(d.get("num_hidden_layers", 32)),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos,
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=_ids(d.get("eos_token_id", 2)),
        )


@dataclass(frozen=True)
class PixelConfig:
    """How uint8 pixels become model input: `(x * rescale_factor - mean) / std` (transformers' fused form)."""

    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PixelConfig:
        def rgb(v: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
            if v is None:
                return default
            if isinstance(v, (int, float)):
                return (float(v),) * 3
            r, g, b = v
            return (float(r), float(g), float(b))

        return cls(
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            image_mean=rgb(d.get("image_mean"), (0.5, 0.5, 0.5)),
            image_std=rgb(d.get("image_std"), (0.5, 0.5, 0.5)),
            do_rescale=bool(d.get("do_rescale", True)),
            do_normalize=bool(d.get("do_normalize", True)),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> PixelConfig:
        """From `processor_config.json` (5.x: its `image_processor` / `video_processor`) or the 4.x files
        `preprocessor_config.json` / `video_preprocessor_config.json`.

        The model normalises image tiles and video frames alike on the device, so a checkpoint whose video
        processor normalises differently is refused here rather than served with wrong pixels (the released
        checkpoints use (x - 127.5) / 127.5 for both).
        """
        image, video = _processor_dicts(folder)
        pixel = cls.from_dict(image) if image is not None else cls()
        if video is not None and cls.from_dict(video) != pixel:
            raise ValueError(
                f"{folder}: the video processor normalises frames differently from the image processor "
                f"({cls.from_dict(video)} vs {pixel}); plm-serve applies one normalisation to both"
            )
        return pixel


def _processor_dicts(folder: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(image processor dict, video processor dict) of a checkpoint folder, None where absent."""
    found: dict[str, dict[str, Any] | None] = {"image_processor": None, "video_processor": None}
    proc = folder / "processor_config.json"
    if proc.is_file():
        d = json.loads(proc.read_text())
        for key in found:
            if isinstance(d.get(key), dict):
                found[key] = d[key]
    for key, name in (
        ("image_processor", "preprocessor_config.json"),
        ("video_processor", "video_preprocessor_config.json"),
    ):
        path = folder / name
        if found[key] is None and path.is_file():
            found[key] = json.loads(path.read_text())
    return found["image_processor"], found["video_processor"]


def _ids(v: int | list[int] | tuple[int, ...] | None) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


@dataclass(frozen=True)
class PLMConfig:
    """Everything needed to build and run a PerceptionLM (`from_pretrained`, `from_dict`, `from_preset`)."""

    vision: VisionConfig
    text: TextConfig
    image_token_id: int = 128002
    video_token_id: int = 128003
    projector_pooling_ratio: int = 1  # transformers' default; every released model uses 2
    vision_use_cls_token: bool = True  # drop token 0 of the tower output
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    dtype: str | None = None  # checkpoint dtype as saved ("bfloat16", "float32", ...)
    pixel: PixelConfig = field(default_factory=PixelConfig)

    @property
    def tokens_per_tile(self) -> int:
        """Decoder tokens per 448px tile or video frame: (448 / 14 / 2)^2 = 256 for the released models."""
        side = self.vision.grid_size
        r = self.projector_pooling_ratio
        return (side // r) ** 2 if r > 1 else side * side

    @property
    def max_model_len(self) -> int:
        return self.text.max_position_embeddings

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], generation: dict[str, Any] | None = None, pixel: PixelConfig | None = None
    ) -> PLMConfig:
        """`d`: a PerceptionLM `config.json` (4.x or 5.x); `generation`: its `generation_config.json`."""
        if d.get("model_type", "perception_lm") != "perception_lm":
            raise ValueError(f"model_type must be 'perception_lm', got {d.get('model_type')!r}")
        vd = d.get("vision_config") or {}
        if vd.get("model_type", "timm_wrapper") != "timm_wrapper":
            raise ValueError(f"vision_config.model_type must be 'timm_wrapper', got {vd.get('model_type')!r}")
        vision = VisionConfig.from_timm(vd.get("architecture", ""), vd.get("model_args"))
        text = TextConfig.from_dict(d.get("text_config") or {})
        use_cls = bool(d.get("vision_use_cls_token", True))
        if use_cls != vision.class_token:
            # transformers would silently drop a patch token (or keep the CLS); refuse instead
            raise ValueError(
                f"vision_use_cls_token={use_cls} but the tower {vision.architecture} has "
                f"class_token={vision.class_token}"
            )
        tie = d.get("tie_word_embeddings")  # None: follow the text config (PerceptionLMConfig.__post_init__)
        eos = _ids((generation or {}).get("eos_token_id")) or text.eos_token_id
        return cls(
            vision=vision,
            text=text,
            image_token_id=int(d.get("image_token_id", 128002)),
            video_token_id=int(d.get("video_token_id", 128003)),
            projector_pooling_ratio=int(d.get("projector_pooling_ratio", 1)),
            vision_use_cls_token=use_cls,
            tie_word_embeddings=text.tie_word_embeddings if tie is None else bool(tie),
            eos_token_ids=eos,
            dtype=d.get("dtype") or d.get("torch_dtype"),
            pixel=pixel or PixelConfig(),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PLMConfig:
        """Read a checkpoint folder: `config.json` [+ `generation_config.json`, processor configs]."""
        folder = Path(path)
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config.json in {folder}")
        gen_file = folder / "generation_config.json"
        generation = json.loads(gen_file.read_text()) if gen_file.is_file() else None
        return cls.from_dict(json.loads(cfg_file.read_text()), generation, PixelConfig.from_folder(folder))

    @classmethod
    def from_preset(cls, name: str | Path) -> PLMConfig:
        """A shipped model shape (`plm_serve.configs`, `models/<name>.json`) (e.g. "plm-8b", "tiny-demo"), or a config path."""
        return cls.from_dict(load_preset_dict(name))


def load_preset_dict(name: str | Path) -> dict[str, Any]:
    """The raw config.json dict of a preset name or a path (a file, or a folder holding config.json)."""
    p = Path(name)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return json.loads(p.read_text())
    shipped = configs.model_preset(str(name))
    if shipped is None:
        known = configs.model_preset_names()
        raise FileNotFoundError(f"no model preset {str(name)!r}; known presets: {known}")
    return json.loads(shipped.read_text())
