"""The harness of bench/gpu_check.py: engines around one loaded model, workloads, timing and roofline arithmetic.

Everything runs on CUDA or, for `gpu_check.py --dry-run`, on the CPU with a tiny preset: nothing here assumes a GPU
except where `torch.cuda` is asked. Prompts are token ids (no Llama-3 tokenizer file is needed: the engine's
detokenizer gets a word-level stand-in of the model's vocabulary size), images are random uint8 tiles.

Roofline formulas (the project's own derivation, see docs/engine-gpu.md): with N_body the decoder's parameters
without the embedding, V x D the LM head and kv_tok = L * 2 * n_kv * head_dim * 2 bytes,
    decode step bytes  = 2 * (N_body + V * D) + sum(ctx_i) * kv_tok
    prefill FLOP/token = 2 * N_body + 2 * L * n_heads * head_dim * S          (average over a causal prompt of S)
    vision FLOP/tile   = 2 * P * 588 * d + L_v * (2 * T * (4 d^2 + 2 d m) + 4 * T^2 * d) + 2 * P * (d * D + D^2)
with P = 1024 patches, T = ViT tokens per tile (1025 with CLS), d/m/L_v the tower's width/MLP/depth.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from plm_serve.engine import EngineConfig, EngineCore, EngineRequest, MMInput, SamplingParams
from plm_serve.engine.model_runner import ModelRunner
from plm_serve.engine.scheduler_output import NewSequence, ScheduledChunk, SchedulerOutput
from plm_serve.models import PerceptionLM, PLMConfig

BOS, IMAGE = 128000, 128002
HEAD = [BOS, 128006, 882, 128007, 271]  # <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n
TAIL = [128009, 128006, 78191, 128007, 271]  # <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n


# --------------------------------------------------------------------------------------------- rooflines
@dataclass(frozen=True)
class Shapes:
    """The numbers the rooflines need, from a model config (bf16 weights and KV)."""

    n_body: int
    vocab_x_hidden: int
    layers: int
    heads_x_head_dim: int
    kv_bytes_per_token: int
    vision_flops_per_tile: float

    @classmethod
    def of(cls, cfg: PLMConfig) -> Shapes:
        t, v = cfg.text, cfg.vision
        d_model, hd, h, kv, ff = (
            t.hidden_size,
            t.head_dim,
            t.num_attention_heads,
            t.num_key_value_heads,
            t.intermediate_size,
        )
        per_layer = (
            d_model * h * hd + 2 * d_model * kv * hd + h * hd * d_model + 3 * d_model * ff + 2 * d_model
        )
        patches = v.grid_size**2
        tokens = v.num_prefix_tokens + patches
        d, m = v.embed_dim, v.mlp_hidden
        vision = 2 * patches * 3 * v.patch_size**2 * d + v.depth * (
            2 * tokens * (4 * d * d + 2 * d * m) + 4 * tokens * tokens * d
        )
        vision += 2 * patches * (d * d_model + d_model * d_model)  # the projector, before pooling
        return cls(
            n_body=t.num_hidden_layers * per_layer + d_model,
            vocab_x_hidden=t.vocab_size * d_model,
            layers=t.num_hidden_layers,
            heads_x_head_dim=h * hd,
            kv_bytes_per_token=t.num_hidden_layers * 2 * kv * hd * 2,
            vision_flops_per_tile=float(vision),
        )

    def decode_bytes(self, batch: int, ctx: int) -> float:
        return 2 * (self.n_body + self.vocab_x_hidden) + batch * ctx * self.kv_bytes_per_token

    def prefill_flops_per_token(self, prompt: int) -> float:
        return 2 * self.n_body + 2 * self.layers * self.heads_x_head_dim * prompt


# ------------------------------------------------------------------------------------------------ engines
def bench_tokenizer(vocab_size: int) -> Tokenizer:
    """A word-level tokenizer over `vocab_size` ids: what the detokenizer needs, without the Llama-3 file."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def make_core(model: PerceptionLM, tokenizer: Tokenizer, **config) -> EngineCore:
    """An engine around an already loaded model (several engines, one after the other, share its weights).
    `attention_backend="torch"` is the reference path whatever "auto" would pick."""
    device, dtype = model.device, model.dtype
    cfg = EngineConfig(model="<in memory>", device=device.type, **config)
    runner = ModelRunner(model, cfg, device, dtype)
    return EngineCore(cfg, runner, tokenizer, model.config)


def free(*objects) -> None:
    """Drop engines/models and give their memory back before the next section allocates."""
    import gc

    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- workloads
def text_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[BOS, *rng.integers(1000, 100_000, size=length - 1).tolist()] for _ in range(n)]


def image_prompt(
    index: int, tiles: int, tokens_per_tile: int, words: int = 50
) -> tuple[list[int], list[MMInput]]:
    """A chat turn with one image of `tiles` random tiles (its own content hash) and ~`words` text tokens."""
    rng = np.random.default_rng(1000 + index)
    pixels = torch.from_numpy(rng.integers(0, 256, size=(tiles, 3, 448, 448), dtype=np.uint8))
    text = rng.integers(1000, 100_000, size=words).tolist()
    ids = [*HEAD, *[IMAGE] * (tiles * tokens_per_tile), *text, *TAIL]
    return ids, [MMInput(f"bench-image-{index}", pixels, len(HEAD), tiles * tokens_per_tile)]


@dataclass
class RunStats:
    seconds: float
    tokens: dict[str, list[int]]
    ttft: list[float] = field(default_factory=list)  # seconds, per request
    itl: list[float] = field(default_factory=list)  # seconds between consecutive tokens of a request

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens.values())


def run_closed_loop(
    core: EngineCore, requests: list[tuple[list[int], list[MMInput]]], concurrency: int, out_tokens: int
) -> RunStats:
    """Keep `concurrency` requests in flight (greedy, exactly `out_tokens` each) until all are done."""
    device = core.runner.device
    pending = list(enumerate(requests))
    tokens: dict[str, list[int]] = {}
    added: dict[str, float] = {}
    last: dict[str, float] = {}
    stats = RunStats(0.0, tokens)
    sync(device)
    t0 = time.perf_counter()
    open_requests = 0
    while pending or core.has_unfinished():
        while pending and open_requests < concurrency:
            i, (ids, media) = pending.pop(0)
            rid = f"r{i}"
            params = SamplingParams(max_tokens=out_tokens, min_tokens=out_tokens)
            core.add_request(EngineRequest(rid, list(ids), params, list(media)))
            tokens[rid], added[rid] = [], time.perf_counter()
            open_requests += 1
        outputs = core.step()
        now = time.perf_counter()
        for out in outputs:
            assert out.error is None, out.error
            rid = out.request_id
            if not tokens[rid]:
                stats.ttft.append(now - added[rid])
            else:
                stats.itl.append(now - last[rid])
            last[rid] = now
            tokens[rid].extend(out.token_ids)
            open_requests -= out.finished
    sync(device)
    stats.seconds = time.perf_counter() - t0
    core.scheduler.check_integrity()
    return stats


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def hf_generate(
    hf_model, requests: list[tuple[list[int], list[MMInput]]], out_tokens: int
) -> tuple[float, list[list[int]]]:
    """transformers' generate() on one left-padded batch of the same requests (greedy, EOS masked)."""
    device = hf_model.device
    width = max(len(ids) for ids, _ in requests)
    pad = 128001
    ids = torch.tensor([[pad] * (width - len(i)) + i for i, _ in requests], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i, _ in requests], device=device)
    kwargs = {}
    pixels = [m.pixels for _, media in requests for m in media]
    if pixels:
        px = torch.stack(pixels).to(device, torch.float32)
        kwargs["pixel_values"] = ((px - 127.5) / 127.5).to(hf_model.dtype)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=out_tokens,
            min_new_tokens=out_tokens, pad_token_id=pad, **kwargs,
        )  # fmt: skip
    sync(device)
    return time.perf_counter() - t0, out[:, width:].tolist()


# --------------------------------------------------------------------------------------- microbenchmarks
def _slot_outputs(batch: int, ctx: int, block_size: int) -> tuple[SchedulerOutput, SchedulerOutput]:
    """(first, again): `batch` sequences of `ctx` known tokens in slots 0..batch-1 decoding position ctx - 1.

    `first` installs them; `again` is the same decode step with nothing new, so repeating it keeps every
    context at `ctx` (a frozen context: the same shapes every step)."""
    blocks = -(-(ctx + 1) // block_size)
    rng = np.random.default_rng(0)
    news = [
        NewSequence(i, i, rng.integers(1000, 100_000, size=ctx).tolist(), ctx, SamplingParams(max_tokens=None),
                    0, list(range(i * blocks, (i + 1) * blocks)))
        for i in range(batch)
    ]  # fmt: skip
    chunks = [ScheduledChunk(i, i, ctx - 1, 1, True) for i in range(batch)]
    first = SchedulerOutput(chunks, news, [], [], [], batch)
    again = SchedulerOutput(
        [ScheduledChunk(i, i, ctx - 1, 1, True) for i in range(batch)], [], [], [], [], batch
    )
    return first, again


def decode_step_seconds(runner: ModelRunner, batch: int, ctx: int, steps: int, graphs: bool) -> float:
    """Seconds per decode step at `batch` x `ctx` (KV pool content random), graph replay or eager."""
    assert runner.kv_cache is not None
    saved = runner.graphs
    runner.graphs = saved if graphs else None
    try:
        first, again = _slot_outputs(batch, ctx, runner.block_size)
        runner.execute(first)
        for _ in range(3):
            runner.execute(again)
        sync(runner.device)
        t0 = time.perf_counter()
        pending = [runner.launch(again) for _ in range(steps)]
        pending[-1].wait()
        sync(runner.device)
        return (time.perf_counter() - t0) / steps
    finally:
        runner.graphs = saved


def prefill_seconds(runner: ModelRunner, num_tokens: int, repeats: int = 3) -> float:
    """Best seconds of one `num_tokens`-token prompt prefilled in one chunk (slot 0), logits of its last row."""
    rng = np.random.default_rng(1)
    blocks = list(range(-(-(num_tokens + 1) // runner.block_size)))
    best = math.inf
    for r in range(repeats + 1):
        tokens = rng.integers(1000, 100_000, size=num_tokens).tolist()
        new = NewSequence(r, 0, tokens, num_tokens, SamplingParams(), 0, blocks)
        out = SchedulerOutput([ScheduledChunk(r, 0, 0, num_tokens, True)], [new], [], [], [], num_tokens)
        sync(runner.device)
        t0 = time.perf_counter()
        runner.execute(out)
        sync(runner.device)
        if r:  # the first run warms up
            best = min(best, time.perf_counter() - t0)
    return best


def vision_seconds(runner: ModelRunner, tiles: int, repeats: int = 3) -> float:
    """Best seconds of `tiles` random tiles through the runner's bucketed vision path (pixels on the device)."""
    px = torch.randint(0, 256, (tiles, 3, 448, 448), dtype=torch.uint8, device=runner.device)
    best = math.inf
    with torch.inference_mode():
        for r in range(repeats + 1):
            sync(runner.device)
            t0 = time.perf_counter()
            runner.encode_tiles(px)
            sync(runner.device)
            if r:
                best = min(best, time.perf_counter() - t0)
    return best
