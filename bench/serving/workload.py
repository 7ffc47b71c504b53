"""Named workload scenarios: each turns (number of requests, options, seed) into a list of chat requests.

Every request is made offline and up front (no dataset is downloaded, media are inline data: URLs), so all
servers of a run get the same request set, and encoding media is never part of the measured time.

Text lengths are "ShareGPT-like": long-tailed log-normal prompt and reply lengths with medians of a couple of
hundred tokens, the shape of the public chat logs that vLLM's and SGLang's benchmarks replay, but drawn here
from fixed parameters (`PROMPT_LENGTH`, `REPLY_LENGTH`) rather than fitted to or read from the dataset. Prompt
text is common English words, about one Llama-3 token each; the servers' own token counts are recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bench.serving import media

# (median, sigma of log, min, max) of log-normal lengths, in tokens.
PROMPT_LENGTH = (180, 0.9, 8, 1536)
REPLY_LENGTH = (160, 0.9, 8, 2048)

_COMMON_WORDS = (
    "the of and to in is it that for on was with as at by be this are from or have an they which one you were "
    "all we can her has there been if more when will would who so no out up into than them about its time only "
    "new some could these two may first then do any like my now over such our man me even most made after also "
    "did many before must through back years where much your way well down should because each just those people "
    "how too little state good very make world still own see men work long get here between both life being under "
    "never day same another know while last might us great old year off come since against go came right used take "
    "three river light water city music story house small large early second place point number system group"
)
WORDS = tuple(_COMMON_WORDS.split())


@dataclass(frozen=True)
class WorkloadOptions:
    """Knobs shared by the scenarios (CLI flags of the same names)."""

    image_width: int = 640
    image_height: int = 480
    video_frames: int = 8
    video_width: int = 320
    video_height: int = 240
    max_output_tokens: int = 256  # cap on text-chat reply lengths (drawn from REPLY_LENGTH)
    media_output_tokens: int = 64  # reply length of every media scenario
    repeat_pool: int = 2  # distinct images that image-repeat cycles through
    images_per_request: int = 3  # multi-image


@dataclass(frozen=True)
class RequestSpec:
    """One chat request, server-independent: the OpenAI `messages` and how many tokens it must generate."""

    scenario: str
    messages: list[dict]
    max_tokens: int


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    build: Callable[[int, WorkloadOptions, np.random.Generator], list[RequestSpec]]


def _lengths(rng: np.random.Generator, n: int, spec: tuple[int, float, int, int], cap: int | None = None):
    median, sigma, low, high = spec
    drawn = rng.lognormal(np.log(median), sigma, size=n)
    return np.clip(np.rint(drawn), low, min(high, cap or high)).astype(int).tolist()


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=n))


def _user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def _image_part(opts: WorkloadOptions, seed: int, detail: str) -> dict:
    url = media.data_url(media.jpeg(opts.image_width, opts.image_height, seed), "image/jpeg")
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


def _seeds(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(0, 2**31, size=n).tolist()


def text_chat(n: int, opts: WorkloadOptions, rng: np.random.Generator) -> list[RequestSpec]:
    prompts = _lengths(rng, n, PROMPT_LENGTH)
    replies = _lengths(rng, n, REPLY_LENGTH, cap=opts.max_output_tokens)
    return [
        RequestSpec("text-chat", _user(f"Please answer: {_words(rng, p)}"), r)
        for p, r in zip(prompts, replies, strict=True)
    ]


def _one_image(detail: str, name: str):
    def build(n: int, opts: WorkloadOptions, rng: np.random.Generator) -> list[RequestSpec]:
        return [
            RequestSpec(
                name,
                _user([_image_part(opts, seed, detail), {"type": "text", "text": "Describe this picture."}]),
                opts.media_output_tokens,
            )
            for seed in _seeds(rng, n)
        ]

    return build


def image_repeat(n: int, opts: WorkloadOptions, rng: np.random.Generator) -> list[RequestSpec]:
    """A few images asked about again and again (different questions after the same image: a shared prefix)."""
    pool = [_image_part(opts, seed, "high") for seed in _seeds(rng, opts.repeat_pool)]
    return [
        RequestSpec(
            "image-repeat",
            _user([pool[i % len(pool)], {"type": "text", "text": f"Question {i}: {_words(rng, 12)}?"}]),
            opts.media_output_tokens,
        )
        for i in range(n)
    ]


def multi_image(n: int, opts: WorkloadOptions, rng: np.random.Generator) -> list[RequestSpec]:
    """Several distinct low-detail images per request (one 448 tile each where `detail` is honoured)."""
    specs = []
    for _ in range(n):
        parts = [_image_part(opts, seed, "low") for seed in _seeds(rng, opts.images_per_request)]
        specs.append(
            RequestSpec(
                "multi-image",
                _user([*parts, {"type": "text", "text": "Compare these pictures."}]),
                opts.media_output_tokens,
            )
        )
    return specs


def video_short(n: int, opts: WorkloadOptions, rng: np.random.Generator) -> list[RequestSpec]:
    specs = []
    for seed in _seeds(rng, n):
        data = media.mp4(opts.video_frames, opts.video_width, opts.video_height, seed)
        video = {"type": "video_url", "video_url": {"url": media.data_url(data, "video/mp4")}}
        specs.append(
            RequestSpec(
                "video-short",
                _user([video, {"type": "text", "text": "What happens in this video?"}]),
                opts.media_output_tokens,
            )
        )
    return specs


# The share of each scenario in `mix`: mostly text, as chat traffic is.
MIX_WEIGHTS = {
    "text-chat": 0.5,
    "image-low": 0.15,
    "image-repeat": 0.15,
    "image-high": 0.1,
    "video-short": 0.1,
}


def mix(n: int, opts: WorkloadOptions, rng: np.random.Generator) -> list[RequestSpec]:
    names = list(MIX_WEIGHTS)
    kinds = rng.choice(len(names), size=n, p=np.array(list(MIX_WEIGHTS.values())))
    pools = {
        name: iter(SCENARIOS[name].build(int((kinds == i).sum()), opts, rng)) for i, name in enumerate(names)
    }
    return [next(pools[names[k]]) for k in kinds]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("text-chat", "text only, ShareGPT-like prompt and reply lengths", text_chat),
        Scenario(
            "image-high",
            "one distinct image per request, detail high (thumbnail + tiles)",
            _one_image("high", "image-high"),
        ),
        Scenario(
            "image-low",
            'one distinct image per request, detail "low" (one 448 tile)',
            _one_image("low", "image-low"),
        ),
        Scenario(
            "image-repeat", "a small pool of images asked about again (prefix + encoder caches)", image_repeat
        ),
        Scenario("multi-image", "several distinct low-detail images per request", multi_image),
        Scenario(
            "video-short", "one short distinct MP4 per request (server's default frame sampling)", video_short
        ),
        Scenario("mix", "a weighted mix: " + ", ".join(f"{k} {v:.0%}" for k, v in MIX_WEIGHTS.items()), mix),
    ]
}


def build_requests(scenario: str, n: int, opts: WorkloadOptions, seed: int) -> list[RequestSpec]:
    """`n` requests of `scenario`, the same for the same (scenario, n, options, seed)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r} (known: {', '.join(SCENARIOS)})")
    return SCENARIOS[scenario].build(n, opts, np.random.default_rng(seed))
