"""Engine vs transformers on a GPU, real PLM shapes (random weights): used by bench/gpu_check.py."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from plm_serve.engine import EngineConfig, EngineCore, EngineRequest, MMInput, SamplingParams
from plm_serve.processors import ImageInput, Processor


def _text_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[128000, *rng.integers(1000, 100_000, size=length - 1).tolist()] for _ in range(n)]


def _image_prompts(processor: Processor, n: int) -> list[tuple[list[int], list[MMInput]]]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((1024, 768), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        msgs = [
            {"role": "user", "content": [ImageInput(buf.getvalue()), {"type": "text", "text": f"Image {i}?"}]}
        ]
        p = processor.process_chat(msgs)
        out.append(
            (p.token_ids, [MMInput(m.content_hash, m.pixels, m.offset, m.length, m.kind) for m in p.media])
        )
    return out


def _run_ours(core: EngineCore, prompts, out_tokens: int) -> tuple[float, list[list[int]], float]:
    tokens: dict[str, list[int]] = {}
    first: dict[str, float] = {}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, (ids, media) in enumerate(prompts):
        params = SamplingParams(max_tokens=out_tokens, min_tokens=out_tokens)
        core.add_request(EngineRequest(f"r{i}", ids, params, media))
        tokens[f"r{i}"] = []
    while core.has_unfinished():
        for out in core.step():
            tokens[out.request_id].extend(out.token_ids)
            first.setdefault(out.request_id, time.perf_counter() - t0)
    torch.cuda.synchronize()
    ttft_p50 = float(np.median(list(first.values())))
    return time.perf_counter() - t0, [tokens[f"r{i}"] for i in range(len(prompts))], ttft_p50


def _run_hf(model, prompts, out_tokens: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor([p[0] for p in prompts], device="cuda")
    kwargs = {}
    pixels = [m.pixels for _, media in prompts for m in media]
    if pixels:
        px = torch.stack(pixels).cuda().to(torch.float32)
        kwargs["pixel_values"] = ((px - 127.5) / 127.5).to(model.dtype)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=out_tokens,
            min_new_tokens=out_tokens,
            pad_token_id=128001,
            **kwargs,
        )
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out[:, ids.shape[1] :].tolist()


def compare_engine_and_hf(ckpt: Path, rows: list[dict], quick: bool) -> None:
    core = EngineCore.load(EngineConfig(model=str(ckpt), device="cuda", dtype="bfloat16", max_num_seqs=256))
    rows.append(
        {"check": "engine KV pool (PLM-1B shapes)", "value": f"{core.stats.num_kv_blocks} blocks", "ref": ""}
    )
    processor = Processor.from_pretrained(ckpt)
    workloads = {
        "text 512->128, 64 requests": (_text_prompts(64, 512), 128),
        "1024x768 image (36 tiles)+text ->64, 8 requests": (_image_prompts(processor, 8), 64),
    }
    warm = workloads["text 512->128, 64 requests"][0][:2]
    _run_ours(core, [(ids, []) for ids in warm], 4)
    from transformers import PerceptionLMForConditionalGeneration

    model = PerceptionLMForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    for name, (prompts, out_tokens) in workloads.items():
        prompts = [(p, []) if isinstance(p, list) and isinstance(p[0], int) else p for p in prompts]
        total = len(prompts) * out_tokens
        ours_s, ours_tokens, ttft = _run_ours(core, prompts, out_tokens)
        hf_s, hf_tokens = _run_hf(model, prompts, out_tokens)
        # Random bf16 weights make near-ties common; count how many greedy outputs agree for the first 8 tokens.
        agree = sum(a[:8] == b[:8] for a, b in zip(ours_tokens, hf_tokens, strict=True))
        rows.append(
            {
                "check": f"engine {name}",
                "value": f"ours {total / ours_s:.0f} out tok/s ({ours_s:.2f}s, TTFT p50 {ttft * 1e3:.0f} ms) vs "
                f"HF padded generate {total / hf_s:.0f} tok/s ({hf_s:.2f}s): {hf_s / ours_s:.2f}x",
                "ref": f"first 8 tokens agree {agree}/{len(prompts)}",
            }
        )
