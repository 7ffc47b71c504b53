"""load_model: errors that name tensors, sharded checkpoints, Meta's original/ folder, load dtype, buffers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from plm_serve.models import load_model
from tests.models.conftest import chat_inputs, random_image
from tests.reference import load_hf_processor

CONFIG_FILES = ("config.json", "generation_config.json", "processor_config.json")


def _copy_config(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """Copy the JSON files of `src` into `dst`; return its tensors for the test to rewrite."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        shutil.copy(src / name, dst / name)
    return load_file(src / "model.safetensors")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_missing_tensor_is_named(tmp_path: Path, ckpt_l: Path) -> None:
    tensors = _copy_config(ckpt_l, tmp_path)
    del tensors["model.language_model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"missing tensors \['model\.language_model\.layers\.1\.mlp\.up_proj"
    ):
        load_model(tmp_path)


def test_unexpected_tensor_is_named(tmp_path: Path, ckpt_g: Path) -> None:
    tensors = _copy_config(ckpt_g, tmp_path)
    tensors["model.vision_tower.timm_model.blocks.2.norm1.weight"] = torch.ones(64)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"unexpected tensors \['model\.vision_tower\.timm_model\.blocks\.2\.norm1"
    ):
        load_model(tmp_path)


def test_untied_checkpoint_without_lm_head_is_missing_it(tmp_path: Path, ckpt_g: Path) -> None:
    tensors = _copy_config(ckpt_g, tmp_path)
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['lm_head\.weight'\]"):
        load_model(tmp_path)


def test_wrong_shape_is_named(tmp_path: Path, ckpt_l: Path) -> None:
    tensors = _copy_config(ckpt_l, tmp_path)
    tensors["model.multi_modal_projector.linear_2.bias"] = torch.zeros(65)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"linear_2\.bias .* shape \(65,\)"):
        load_model(tmp_path)


def test_no_weights_file(tmp_path: Path, ckpt_l: Path) -> None:
    _copy_config(ckpt_l, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_model(tmp_path)


def test_sharded_checkpoint_with_index(tmp_path: Path, ckpt_g: Path) -> None:
    tensors = _copy_config(ckpt_g, tmp_path)
    names = sorted(tensors)
    shards = {
        "model-00001-of-00003.safetensors": names[:20],
        "model-00002-of-00003.safetensors": names[20:40],
    }
    shards["model-00003-of-00003.safetensors"] = names[40:]
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _same_weights(load_model(tmp_path), load_model(ckpt_g))


def test_original_folder_is_ignored(tmp_path: Path, ckpt_l: Path) -> None:
    tensors = _copy_config(ckpt_l, tmp_path)
    save_file(tensors, tmp_path / "model.safetensors")
    original = tmp_path / "original"
    original.mkdir()
    (original / "params.json").write_text('{"dim": 2048}')
    (original / "consolidated.pth").write_bytes(b"not a pickle")
    save_file({"tok_embeddings.weight": torch.zeros(2, 2)}, original / "model.safetensors")
    assert _same_weights(load_model(tmp_path), load_model(ckpt_l))


def test_tied_weights_share_storage(ckpt_l: Path, ckpt_g: Path) -> None:
    tied, untied = load_model(ckpt_l), load_model(ckpt_g)
    assert tied.lm_head.weight is tied.model.language_model.embed_tokens.weight
    assert not torch.equal(untied.lm_head.weight, untied.model.language_model.embed_tokens.weight)
    for model in (tied, untied):
        assert all(not p.requires_grad for p in model.parameters())
        assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


@torch.inference_mode()
def test_bf16_load(ckpt_l: Path) -> None:
    fp32, bf16 = load_model(ckpt_l), load_model(ckpt_l, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert (
        bf16.model.vision_tower["timm_model"].rope.cos.dtype == torch.bfloat16
    )  # timm: rope cache in model dtype
    assert bf16.model.language_model.rotary_emb.inv_freq.dtype == torch.float32  # transformers: fp32 inv_freq
    rope32 = fp32.model.language_model.rotary_emb.inv_freq
    assert torch.equal(bf16.model.language_model.rotary_emb.inv_freq, rope32)

    inputs = chat_inputs(load_hf_processor(ckpt_l), [{"type": "image", "image": random_image(5)}], "Hi.")
    ref = fp32.logits_for_prompt(inputs["input_ids"], inputs["pixel_values"], logits_to_keep=64)
    out = bf16.logits_for_prompt(inputs["input_ids"], inputs["pixel_values"], logits_to_keep=64)
    assert out.dtype == torch.float32 and out.shape == ref.shape == (64, 128256)
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2


def test_normalize_pixels(ckpt_l: Path) -> None:
    model = load_model(ckpt_l, dtype=torch.bfloat16)
    pixels = torch.arange(256, dtype=torch.uint8).repeat(3, 2, 1).unsqueeze(0)  # [1, 3, 2, 256]
    out = model.normalize_pixels(pixels)
    expected = ((pixels.float() - 127.5) / 127.5).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
