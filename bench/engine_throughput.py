"""Engine vs transformers' generate(), side by side on the same checkpoint and machine.

    python bench/engine_throughput.py                   # tiny random checkpoint with the real 128k vocabulary, CPU
    python bench/engine_throughput.py --device cuda --checkpoint /path/to/ckpt --dtype bfloat16

Workload: N requests (half text, half with one 640x480 image), greedy, exactly `--output-tokens` tokens each
(EOS masked on both sides, so every system emits the same token count). Systems:
- ours: every request submitted at once to the continuous-batching engine, with its default settings (prefill
  capped at `max_prefill_tokens_per_decode_step` while sequences decode: smooth streams for a server) and with
  the cap off (what an offline batch wants: fewer, fuller steps);
- hf-solo: `generate()` one request at a time;
- hf-padded: `generate()` on one left-padded batch of all requests.
Prints a table of output tok/s and writes it under bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
import source_tree  # bench/ is first on sys.path when a script here runs

source_tree.ensure_importable()

from bench.machine import cpu_model
from plm_serve.engine import EngineConfig, EngineCore
from tests import reference
from tests.engine import engine_fixtures as fx


def build_prompts(processor, n: int) -> list[fx.Prompt]:
    prompts = []
    for i in range(n):
        text = f"Request {i}: tell me something about the number {i * 7}."
        images = [fx.photo(640, 480, i)] if i % 2 else []
        prompts.append(fx.build_prompt(processor, f"p{i}", text, images=images))
    return prompts


def run_ours(
    ckpt: Path, prompts, out_tokens: int, device: str, dtype: str, **overrides
) -> tuple[float, list[list[int]]]:
    config = dict(model=str(ckpt), device=device, dtype=dtype, max_num_batched_tokens=8192, max_num_seqs=256)
    core = EngineCore.load(EngineConfig(**{**config, **overrides}))
    warm = fx.request(prompts[1], "warmup", max_tokens=2)
    core.add_request(warm)
    while core.has_unfinished():
        core.step()
    tokens: dict[str, list[int]] = {}
    _sync(device)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        core.add_request(fx.request(p, f"r{i}", max_tokens=out_tokens, min_tokens=out_tokens))
        tokens[f"r{i}"] = []
    while core.has_unfinished():
        for out in core.step():
            tokens[out.request_id].extend(out.token_ids)
    _sync(device)
    return time.perf_counter() - t0, [tokens[f"r{i}"] for i in range(len(prompts))]


def run_hf_solo(model, prompts, out_tokens: int, device: str) -> tuple[float, list[list[int]]]:
    _sync(device)
    t0 = time.perf_counter()
    outs = [_hf_generate(model, [p], out_tokens, device)[0] for p in prompts]
    _sync(device)
    return time.perf_counter() - t0, outs


def run_hf_padded(model, prompts, out_tokens: int, device: str) -> tuple[float, list[list[int]]]:
    _sync(device)
    t0 = time.perf_counter()
    outs = _hf_generate(model, prompts, out_tokens, device)
    _sync(device)
    return time.perf_counter() - t0, outs


def _hf_generate(model, prompts, out_tokens: int, device: str) -> list[list[int]]:
    width = max(len(p.input_ids) for p in prompts)
    pad = 128001
    ids = torch.tensor([[pad] * (width - len(p.input_ids)) + p.input_ids for p in prompts], device=device)
    mask = torch.tensor(
        [[0] * (width - len(p.input_ids)) + [1] * len(p.input_ids) for p in prompts], device=device
    )
    pixels = [p.pixel_values[0] for p in prompts if p.pixel_values is not None]
    kwargs = {}
    if pixels:
        kwargs["pixel_values"] = torch.stack(pixels).to(device=device, dtype=model.dtype)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=out_tokens,
            min_new_tokens=out_tokens,
            pad_token_id=pad,
            **kwargs,
        )
    return out[:, width:].tolist()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="default: the tiny reference checkpoint"
    )
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-hf-solo", action="store_true")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    ckpt = args.checkpoint or reference.tiny_checkpoint(reference.PE_L)
    processor = reference.load_hf_processor(ckpt)
    prompts = build_prompts(processor, args.num_requests)
    total_out = args.num_requests * args.output_tokens
    rows = []

    ours_s, ours_tokens = run_ours(ckpt, prompts, args.output_tokens, args.device, args.dtype)
    rows.append(("plm-serve engine, defaults (prefill capped while decoding)", ours_s))
    batch_s, batch_tokens = run_ours(
        ckpt, prompts, args.output_tokens, args.device, args.dtype, max_prefill_tokens_per_decode_step=None
    )
    rows.append(("plm-serve engine, prefill cap off (offline batch)", batch_s))
    assert batch_tokens == ours_tokens, "the prefill cap changed greedy outputs"
    hf_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    from transformers import PerceptionLMForConditionalGeneration

    model = PerceptionLMForConditionalGeneration.from_pretrained(ckpt, dtype=hf_dtype).to(args.device).eval()
    padded_s, padded_tokens = run_hf_padded(model, prompts, args.output_tokens, args.device)
    rows.append(("transformers generate(), one padded batch", padded_s))
    if not args.skip_hf_solo:
        solo_s, solo_tokens = run_hf_solo(model, prompts, args.output_tokens, args.device)
        rows.append(("transformers generate(), one request at a time", solo_s))
        same = sum(a == b for a, b in zip(ours_tokens, solo_tokens, strict=True))
    else:
        same = sum(a == b for a, b in zip(ours_tokens, padded_tokens, strict=True))

    prompt_tokens = sum(len(p.input_ids) for p in prompts)
    lines = [
        f"# Engine throughput, {datetime.date.today()}",
        "",
        f"Machine: {cpu_model()}, {torch.get_num_threads()} threads, "
        f"device {args.device}, dtype {args.dtype}, torch {torch.__version__}",
        f"Checkpoint: {ckpt.name}; {args.num_requests} requests (half with a 640x480 image), "
        f"{prompt_tokens} prompt tokens in all, {args.output_tokens} output tokens each (greedy, EOS masked)",
        f"Identical greedy outputs vs transformers: {same}/{args.num_requests}",
        "",
        "| system | seconds | output tok/s | vs padded batch |",
        "|---|---|---|---|",
    ]
    for name, seconds in rows:
        lines.append(f"| {name} | {seconds:.2f} | {total_out / seconds:.1f} | {padded_s / seconds:.2f}x |")
    report = "\n".join(lines) + "\n"
    print(report)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"engine-{datetime.date.today()}-{args.device.split(':')[0]}.md"
    out.write_text(report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
