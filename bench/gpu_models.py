"""GPU checks of the model core (run on a CUDA machine: `python bench/gpu_models.py`).

1. Parity in bf16 on CUDA. Both tiny reference families (tests/reference.py, transformers + timm) are saved,
   loaded by our loader in bf16 on the GPU, and compared with the fp32 CPU transformers model on an image
   prompt and a video prompt. Pass: relative error ||ours - ref|| / ||ref|| of the logits and of the media
   features <= 1e-2. Also reported: ours in fp32 on the GPU (TF32 convolutions may show ~1e-4), and
   transformers' own bf16 model on the GPU, against the same reference and against ours.
2. PLM-8B shape, random weights, bf16: one 37-tile image (9472 placeholder tokens) + text through the vision
   tower, the projector and the decoder, with timings and peak memory.

`run(report)` appends one dict per check to `report`; `__main__` prints them and exits non-zero on a failure.
No tokenizer or processor is needed: prompts are built from token ids and random pixels.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
import source_tree  # bench/ is first on sys.path when a script here runs

source_tree.ensure_importable()

from plm_serve.models import DenseCausalAttention, PerceptionLM, PLMConfig, build_model, load_model

REL_TOL = 1e-2
IMAGE, VIDEO, BOS = 128002, 128003, 128000
HEAD = [BOS, 128006, 882, 128007, 271]  # <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n
TAIL = [75885, 279, 2217, 13, 128009, 128006, 78191, 128007, 271]  # Describe the image.<|eot_id|>(assistant)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def _prompt(token: int, tiles: int, tokens_per_tile: int) -> torch.Tensor:
    return torch.tensor([*HEAD, *[token] * (tiles * tokens_per_tile), *TAIL])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def parity_bf16(report: list[dict], device: str = "cuda") -> None:
    from tests import reference  # transformers + timm, needed for this check only

    for variant in (reference.PE_L, reference.PE_G):
        name = f"parity-{variant.family}"
        try:
            hf = reference.build_hf_model(variant)  # fp32, CPU: the reference
            with tempfile.TemporaryDirectory() as tmp:
                hf.save_pretrained(tmp)
                ours = {
                    dt: load_model(tmp, device=device, dtype=dt) for dt in (torch.bfloat16, torch.float32)
                }
                hf_bf16 = type(hf).from_pretrained(tmp, dtype=torch.bfloat16).to(device).eval()
            gen = torch.Generator().manual_seed(0)
            for kind, token, n in (("image", IMAGE, 5), ("video", VIDEO, 3)):
                pixels = torch.rand(n, 3, 448, 448, generator=gen) * 2 - 1  # normalized tiles / frames
                ids = _prompt(token, n, 256)
                key = "pixel_values" if kind == "image" else "pixel_values_videos"
                ref_logits = hf(input_ids=ids[None], **{key: pixels[None]}).logits[0]
                ref_feats = hf.model.get_image_features(pixels[None])
                ref_feats = getattr(ref_feats, "pooler_output", ref_feats)  # a plain tensor in older 5.x
                row: dict = {"check": name, "prompt": kind, "tokens": int(ids.shape[0])}
                for dt, model in ours.items():
                    tag = "bf16" if dt == torch.bfloat16 else "fp32"
                    feats = model.encode_media(pixels.to(device, dt))
                    logits = model.logits_for_prompt(ids.to(device), **{key: pixels.to(device)})
                    row[f"{tag}_feat_rel"] = _rel(feats, ref_feats)
                    row[f"{tag}_logit_rel"] = _rel(logits, ref_logits)
                    row[f"{tag}_logit_maxabs"] = float((logits.cpu() - ref_logits).abs().max())
                    row[f"{tag}_argmax_agree"] = float(
                        (logits.cpu().argmax(-1) == ref_logits.argmax(-1)).double().mean()
                    )
                    if dt == torch.bfloat16:
                        ours_bf16 = logits
                hf_out = hf_bf16(
                    input_ids=ids[None].to(device), **{key: pixels[None].to(device, torch.bfloat16)}
                )
                hf_logits = hf_out.logits[0].float()
                row["hf_bf16_logit_rel"] = _rel(hf_logits, ref_logits)
                row["ours_vs_hf_bf16_logit_rel"] = _rel(ours_bf16, hf_logits)
                row["ok"] = row["bf16_logit_rel"] <= REL_TOL and row["bf16_feat_rel"] <= REL_TOL
                report.append(row)
        except Exception as e:  # keep going: the forward check is independent
            traceback.print_exc()
            report.append({"check": name, "ok": False, "error": repr(e)})


def _timed_step(
    model: PerceptionLM, pixels_u8: torch.Tensor, ids: torch.Tensor
) -> tuple[float, float, torch.Tensor]:
    """One prompt: vision (normalize + tower + projector) and decoder prefill timed apart; last-row logits."""
    device = str(ids.device)
    _sync(device)
    a = time.perf_counter()
    media = model.encode_media(model.normalize_pixels(pixels_u8))  # [tiles, 256, H]
    _sync(device)
    b = time.perf_counter()
    is_media = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    embeds = model.embed_tokens(ids).masked_scatter(is_media[:, None], media.flatten(0, 1))
    positions = torch.arange(ids.shape[0], device=ids.device)
    hidden = model(embeds, positions, DenseCausalAttention([int(ids.shape[0])]))
    logits = model.compute_logits(hidden[-1:])
    _sync(device)
    return b - a, time.perf_counter() - b, logits


@torch.inference_mode()
def plm_forward(
    report: list[dict], preset: str = "plm-8b", tiles: int = 37, repeats: int = 3, device: str = "cuda"
) -> None:
    """A random-weight `preset` in bf16: build time, then the best of `repeats` forwards after a warm-up."""
    row: dict = {"check": f"{preset}-forward", "tiles": tiles}
    cuda = device.startswith("cuda")
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        config = PLMConfig.from_preset(preset)
        model = build_model(config, device=device, dtype=torch.bfloat16, init="random", seed=0)
        _sync(device)
        row["build_s"] = round(time.perf_counter() - t0, 2)
        if cuda:
            row["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        pixels_u8 = torch.randint(0, 256, (tiles, 3, 448, 448), dtype=torch.uint8, device=device)
        ids = _prompt(IMAGE, tiles, config.tokens_per_tile).to(device)
        row["tokens"] = int(ids.shape[0])
        _timed_step(model, pixels_u8, ids)  # warm-up: kernel selection, allocator
        times = [_timed_step(model, pixels_u8, ids) for _ in range(repeats)]
        vision, decoder = min(t[0] for t in times), min(t[1] for t in times)
        row.update(
            vision_ms=round(vision * 1e3, 1),
            vision_tiles_per_s=round(tiles / vision, 1),
            decoder_prefill_ms=round(decoder * 1e3, 1),
            prefill_tokens_per_s=round(row["tokens"] / decoder),
            logits_finite=bool(torch.isfinite(times[-1][2]).all()),
        )
        if cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["ok"] = row["logits_finite"]
    except Exception as e:
        traceback.print_exc()
        row.update(ok=False, error=repr(e))
    report.append(row)


def run(report: list[dict]) -> None:
    """All GPU model checks; one dict per check (with "ok") is appended to `report`."""
    if not torch.cuda.is_available():
        print("gpu_models: no CUDA device, nothing to check")
        report.append({"check": "cuda", "ok": False, "error": "no CUDA device"})
        return
    print(f"gpu_models: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    parity_bf16(report)
    torch.cuda.empty_cache()
    plm_forward(report, "plm-8b", tiles=37)


if __name__ == "__main__":
    results: list[dict] = []
    run(results)
    for r in results:
        print(
            ("PASS " if r.get("ok") else "FAIL ") + ", ".join(f"{k}={v}" for k, v in r.items() if k != "ok")
        )
    sys.exit(0 if results and all(r.get("ok") for r in results) else 1)
