"""PLMConfig: reading transformers config.json (4.x and 5.x), presets and their exact parameter counts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from plm_serve.models import PLMConfig, build_model
from plm_serve.models.config import PixelConfig, RopeScaling, VisionConfig
from plm_serve.models.loader import count_parameters


def _to_4x(d: dict) -> dict:
    """The same config as transformers 4.x writes it: rope_theta + rope_scaling, torch_dtype."""
    d = copy.deepcopy(d)
    text = d["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    d["torch_dtype"] = d.pop("dtype")
    return d


@pytest.mark.parametrize("fixture", ["ckpt_l", "ckpt_g"])
def test_4x_and_5x_configs_agree(request: pytest.FixtureRequest, fixture: str) -> None:
    path: Path = request.getfixturevalue(fixture)
    d5 = json.loads((path / "config.json").read_text())
    gen = json.loads((path / "generation_config.json").read_text())
    c5 = PLMConfig.from_dict(d5, gen)
    assert PLMConfig.from_dict(_to_4x(d5), gen) == c5
    old_style = _to_4x(d5)  # pre-4.45 rope_scaling used "type" instead of "rope_type"
    if old_style["text_config"]["rope_scaling"]:
        old_style["text_config"]["rope_scaling"]["type"] = old_style["text_config"]["rope_scaling"].pop(
            "rope_type"
        )
    assert PLMConfig.from_dict(old_style, gen) == c5


def test_tiny_checkpoint_configs(ckpt_l: Path, ckpt_g: Path) -> None:
    cl, cg = PLMConfig.from_pretrained(ckpt_l), PLMConfig.from_pretrained(ckpt_g)
    assert cl.vision.class_token and cl.vision_use_cls_token and cl.vision.rope_grid_offset == 1.0
    assert not cg.vision.class_token and not cg.vision_use_cls_token and cg.vision.rope_grid_offset == 0.0
    assert (cl.vision.embed_dim, cl.vision.depth, cl.vision.num_heads, cl.vision.mlp_hidden) == (
        64,
        2,
        4,
        256,
    )
    assert cg.vision.mlp_hidden == int(64 * 8960 / 1536)
    assert not cl.vision.post_norm and cl.vision.pre_norm and cl.vision.init_values == 0.1
    assert cl.tie_word_embeddings and not cg.tie_word_embeddings
    assert cl.text.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192) and cg.text.rope_scaling is None
    assert cl.text.rope_theta == cg.text.rope_theta == 500000.0
    assert (cl.text.num_key_value_heads, cl.text.head_dim) == (2, 16)
    assert cl.tokens_per_tile == 256 and cl.max_model_len == 11520
    assert cl.eos_token_ids == (128001, 128009)
    assert (cl.image_token_id, cl.video_token_id, cl.projector_pooling_ratio) == (128002, 128003, 2)
    assert cl.pixel == PixelConfig()  # processor_config.json: 1/255, mean = std = 0.5


def test_eos_falls_back_to_text_config(ckpt_l: Path) -> None:
    d = json.loads((ckpt_l / "config.json").read_text())
    d["text_config"]["eos_token_id"] = 128009
    assert PLMConfig.from_dict(d).eos_token_ids == (128009,)
    assert PLMConfig.from_dict(d, {"eos_token_id": [1, 2]}).eos_token_ids == (1, 2)


def test_pixel_config_from_4x_preprocessor_file(tmp_path: Path, ckpt_l: Path) -> None:
    (tmp_path / "config.json").write_text((ckpt_l / "config.json").read_text())
    pre = {"rescale_factor": 0.5, "image_mean": [0.1, 0.2, 0.3], "image_std": 0.25, "do_rescale": True}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    config = PLMConfig.from_pretrained(tmp_path)
    assert config.pixel == PixelConfig(0.5, (0.1, 0.2, 0.3), (0.25, 0.25, 0.25), True, True)
    model = build_model(config, init="meta")  # normalize_pixels needs no weights
    pixels = torch.tensor([0, 1, 2, 255], dtype=torch.uint8).view(1, 1, 1, 4).expand(1, 3, 2, 4)
    expected = (pixels * 0.5 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 0.25
    assert torch.allclose(model.normalize_pixels(pixels), expected, atol=1e-6)


def test_a_video_normalisation_unlike_the_image_one_is_refused(tmp_path: Path, ckpt_l: Path) -> None:
    (tmp_path / "config.json").write_text((ckpt_l / "config.json").read_text())
    same = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    proc = {"image_processor": same, "video_processor": same}
    (tmp_path / "processor_config.json").write_text(json.dumps(proc))
    assert PLMConfig.from_pretrained(tmp_path).pixel == PixelConfig()
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"image_mean": 0.4}))  # 4.x file
    assert PLMConfig.from_pretrained(tmp_path).pixel == PixelConfig()  # the 5.x entry wins
    proc["video_processor"] = {"image_mean": [0.4, 0.4, 0.4]}
    (tmp_path / "processor_config.json").write_text(json.dumps(proc))
    with pytest.raises(ValueError, match="normalises frames differently"):
        PLMConfig.from_pretrained(tmp_path)


def test_unknown_architecture_and_options_are_rejected(ckpt_l: Path) -> None:
    d = json.loads((ckpt_l / "config.json").read_text())
    bad = copy.deepcopy(d)
    bad["vision_config"]["architecture"] = "vit_base_patch16_224"
    with pytest.raises(ValueError, match="unknown vision architecture 'vit_base_patch16_224'"):
        PLMConfig.from_dict(bad)
    bad = copy.deepcopy(d)
    bad["vision_config"]["model_args"]["swiglu_mlp"] = True
    with pytest.raises(ValueError, match="swiglu_mlp"):
        PLMConfig.from_dict(bad)
    bad = copy.deepcopy(d)
    bad["vision_use_cls_token"] = False
    with pytest.raises(ValueError, match="class_token"):
        PLMConfig.from_dict(bad)
    bad = copy.deepcopy(d)
    bad["text_config"]["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0}
    with pytest.raises(ValueError, match="yarn"):
        PLMConfig.from_dict(bad)


def test_arch_defaults_fill_what_model_args_omit() -> None:
    v = VisionConfig.from_timm("vit_pe_core_large_patch14_336", {"global_pool": ""})
    assert (v.img_size, v.depth, v.num_heads, v.ref_feat_shape, v.post_norm) == (336, 24, 16, (24, 24), True)
    g = VisionConfig.from_timm("vit_pe_core_gigantic_patch14_448", {"global_pool": "", "depth": 47})
    assert (g.embed_dim, g.mlp_hidden, g.class_token, g.rope_grid_offset) == (1536, 8960, False, 0.0)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [("plm-1b", 1_533_524_992), ("plm-3b", 3_516_753_920), ("plm-8b", 9_794_260_736)],
)
def test_real_size_presets_have_hub_parameter_counts(preset: str, expected: int) -> None:
    config = PLMConfig.from_preset(preset)
    model = build_model(config, dtype=torch.bfloat16, init="meta")
    assert count_parameters(model) == expected
    assert config.tokens_per_tile == 256 and config.max_model_len == 11520
    assert config.eos_token_ids == (128001, 128009)
    assert config.tie_word_embeddings == (preset != "plm-8b")


def test_preset_accepts_a_path_and_names_unknown_presets(tmp_path: Path) -> None:
    assert PLMConfig.from_preset(Path("configs/models/tiny-demo.json").resolve()) == PLMConfig.from_preset(
        "tiny-demo"
    )
    with pytest.raises(FileNotFoundError, match="plm-1b"):
        PLMConfig.from_preset("plm-70b")
