"""Fused weights and fused ops: merged projections load exactly from transformers' separate tensors and write
back to them; the Triton kernels of `fused_ops` (interpreted without a GPU) match their torch definitions, alone
and inside the whole decoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plm_serve.models import fused_ops, load_model
from plm_serve.models.merged_linear import checkpoint_sources, checkpoint_state
from tests.reference import load_hf_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_merged_projections_hold_the_checkpoint_tensors(ckpt_g: Path) -> None:
    model, tensors = load_model(ckpt_g), load_file(ckpt_g / "model.safetensors")
    layer = model.model.language_model.layers[1]
    prefix = "model.language_model.layers.1."
    qkv = [tensors[prefix + f"self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat(qkv))
    gate_up = [tensors[prefix + f"mlp.{p}_proj.weight"] for p in ("gate", "up")]
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat(gate_up))
    # Written back under transformers' names: exactly the checkpoint (the untied lm_head included).
    state = checkpoint_state(model)
    assert state.keys() == tensors.keys()
    assert all(torch.equal(state[k], tensors[k]) for k in tensors)


def test_parameter_count_is_the_checkpoint_count(ckpt_l: Path) -> None:
    hf, ours = load_hf_model(ckpt_l), load_model(ckpt_l)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    sources = checkpoint_sources(ours)
    qkv = sources["model.language_model.layers.0.self_attn.qkv_proj.weight"]
    assert [name.rsplit(".", 2)[-2] for name, _ in qkv] == ["q_proj", "k_proj", "v_proj"]


def test_bf16_load_casts_each_part(ckpt_l: Path) -> None:
    model, tensors = load_model(ckpt_l, dtype=torch.bfloat16), load_file(ckpt_l / "model.safetensors")
    prefix = "model.language_model.layers.0.mlp."
    want = torch.cat([tensors[prefix + "gate_proj.weight"], tensors[prefix + "up_proj.weight"]]).bfloat16()
    assert torch.equal(model.model.language_model.layers[0].mlp.gate_up_proj.weight, want)


def _triton_ops():
    from plm_serve.models import triton_ops  # defined under the interpreter on CPU (see tests/conftest.py)

    return triton_ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_kernels_match_their_definitions(dtype: torch.dtype) -> None:
    ops = _triton_ops()
    gen = torch.Generator().manual_seed(0)
    x, res = (torch.randn(5, 96, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    w = (1 + 0.2 * torch.randn(96, generator=gen)).to(dtype).to(DEVICE)
    want_sum = res + x
    want = fused_ops.rms_norm_reference(want_sum, w, 1e-5)
    normed, summed = ops.add_rms_norm(x, res, w, 1e-5)
    plain = ops.rms_norm(want_sum, w, 1e-5)
    if dtype == torch.float32:
        assert torch.equal(summed, want_sum)
        torch.testing.assert_close(normed, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(plain, want, atol=1e-6, rtol=1e-6)
    else:  # the interpreter truncates where the GPU rounds: within two bf16 roundings (the norm, the product)
        assert ((summed.float() - want_sum.float()).abs() <= 2.0**-7 * want_sum.float().abs()).all()
        for got in (normed, plain):
            torch.testing.assert_close(got.float(), want.float(), rtol=2 * 2.0**-7, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernel_matches_its_definition(dtype: torch.dtype) -> None:
    gate_up = (3 * torch.randn(7, 2 * 1500, generator=torch.Generator().manual_seed(1))).to(dtype).to(DEVICE)
    got, want = _triton_ops().silu_mul(gate_up), fused_ops.silu_mul_reference(gate_up)
    assert got.shape == want.shape == (7, 1500)  # 1500: two column tiles, the second partial
    tol = 1e-6 if dtype == torch.float32 else 2 * 2.0**-7
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=1e-5)


@torch.inference_mode()
def test_decoder_through_the_fused_kernels(ckpt_l: Path) -> None:
    """The whole tiny decoder with every fused op on its Triton kernel: same logits as the torch path (fp32)."""
    model = load_model(ckpt_l, device=DEVICE)
    ids = torch.tensor([128000, *range(500, 530)], device=DEVICE)
    with fused_ops.kernel_mode("torch"):
        want = model.logits_for_prompt(ids)
    with fused_ops.kernel_mode("triton"):
        got = model.logits_for_prompt(ids)
    assert (got - want).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_kernel_mode_is_checked_and_restored() -> None:
    with pytest.raises(ValueError, match="kernel mode"), fused_ops.kernel_mode("cuda"):
        pass
    x = torch.randn(2, 3)
    with fused_ops.kernel_mode("triton"):
        assert fused_ops._kernels(x) is _triton_ops()
    assert fused_ops._kernels(x) is None  # back to "auto": CPU tensors take the torch definitions
