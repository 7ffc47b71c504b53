"""`plm-serve` / `python -m plm_serve.server`: parse flags over an optional YAML preset, build the configs, run uvicorn.

This is the only module that reads the environment (`PLM_API_KEY`, and the cache location of the demo model).
Settings resolve in this order, last wins: EngineConfig/ServerConfig defaults, `--config` preset, CLI flags.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn
import yaml

from plm_serve import configs
from plm_serve.engine import EngineConfig
from plm_serve.server.app import create_app, drain
from plm_serve.server.config import ServerConfig, server_field_names
from plm_serve.server.demo import ensure_demo_checkpoint
from plm_serve.server.version import VERSION

logger = logging.getLogger("plm_serve.server")

# (flag, argparse kwargs). Every default is None: only flags given on the command line override the preset.
ENGINE_FLAGS: list[tuple[str, dict[str, Any]]] = [
    (
        "--dtype",
        {"choices": ["auto", "float32", "bfloat16", "float16"], "help": "weights dtype (auto: bf16 on GPU)"},
    ),
    ("--device", {"choices": ["auto", "cpu", "cuda"], "help": "auto: CUDA when available"}),
    ("--max-model-len", {"type": int, "help": "context length in tokens (default: the model's, 11520)"}),
    ("--max-num-seqs", {"type": int, "help": "most sequences running at once"}),
    ("--max-num-batched-tokens", {"type": int, "help": "token budget of one engine step"}),
    ("--block-size", {"type": int, "help": "tokens per KV block"}),
    ("--num-kv-blocks", {"type": int, "help": "fixed KV pool size (default: profile GPU memory)"}),
    ("--gpu-memory-utilization", {"type": float, "help": "fraction of GPU memory the engine may use"}),
    (
        "--enable-prefix-caching",
        {"action": argparse.BooleanOptionalAction, "help": "reuse KV of shared prefixes"},
    ),
    ("--encoder-cache-tokens", {"type": int, "help": "vision-encoder output cache, in embedding rows"}),
    ("--max-encoder-tiles-per-step", {"type": int, "help": "vision-encoder budget per step, in tiles"}),
    (
        "--max-prefill-tokens-per-decode-step",
        {
            "type": int,
            "help": "prefill tokens in a step that also decodes (lower: smoother streams, slower TTFT)",
        },
    ),
    (
        "--enable-cuda-graphs",
        {"action": argparse.BooleanOptionalAction, "help": "replay decode steps as CUDA graphs (CUDA only)"},
    ),
    (
        "--overlap-scheduling",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "prepare step N+1 while step N runs (default: on CUDA)",
        },
    ),
    ("--max-waiting-requests", {"type": int, "help": "queue bound; beyond it requests get 429"}),
    ("--seed", {"type": int, "help": "seed of the engine's global RNG"}),
]
SERVER_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--served-model-name", {"help": "model id for clients (default: the checkpoint folder's name)"}),
    ("--host", {"help": "bind address (default 127.0.0.1)"}),
    ("--port", {"type": int, "help": "port (default 8000)"}),
    ("--api-key", {"help": "require 'Authorization: Bearer KEY' on /v1 routes (or set PLM_API_KEY)"}),
    ("--max-request-body-bytes", {"type": int, "help": "largest request body (413 beyond)"}),
    ("--max-image-bytes", {"type": int, "help": "largest image file"}),
    ("--max-image-pixels", {"type": int, "help": "largest image in pixels (decompression-bomb guard)"}),
    ("--max-video-bytes", {"type": int, "help": "largest video file"}),
    ("--max-video-frames", {"type": int, "help": "most sampled frames per video (256 tokens each)"}),
    ("--default-video-frames", {"type": int, "help": "frames sampled when the request does not say"}),
    ("--max-media-per-request", {"type": int, "help": "most images and videos in one request"}),
    ("--media-fetch-timeout-s", {"type": float, "help": "deadline for downloading one media URL"}),
    ("--max-media-redirects", {"type": int, "help": "redirects followed per media URL"}),
    (
        "--allow-private-media-urls",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "allow media URLs on private/loopback/link-local addresses (off: refused, against SSRF)",
        },
    ),
    ("--allowed-local-media-path", {"help": "directory whose files may be sent as file:// URLs or paths"}),
    ("--preprocess-workers", {"type": int, "help": "threads decoding and tiling media"}),
    ("--shutdown-grace-seconds", {"type": float, "help": "on SIGTERM, time running requests get to finish"}),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plm-serve",
        description="OpenAI-compatible server for PerceptionLM (/v1/chat/completions and more).",
    )
    parser.add_argument(
        "--model", help="checkpoint folder; without it a tiny random-weight demo model is served"
    )
    parser.add_argument(
        "--config",
        help="serving preset: a YAML file, or a shipped name (plm-1b, plm-3b, plm-8b, tiny-random); flags given here override it",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    engine = parser.add_argument_group("engine")
    for flag, kwargs in ENGINE_FLAGS:
        engine.add_argument(flag, default=None, **kwargs)
    server = parser.add_argument_group("server")
    for flag, kwargs in SERVER_FLAGS:
        server.add_argument(flag, default=None, **kwargs)
    return parser


def load_preset(path: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(engine settings, server settings) of a YAML preset: flat keys, or `engine:` / `server:` sections."""
    if path is None:
        return {}, {}
    data = yaml.safe_load(_read_preset(path)) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a YAML mapping of settings")
    engine_keys = {f.name for f in dataclasses.fields(EngineConfig)}
    server_keys = server_field_names()
    engine_part, server_part = dict(data.pop("engine", None) or {}), dict(data.pop("server", None) or {})
    for key, value in data.items():
        if key in engine_keys:
            engine_part[key] = value
        if key in server_keys:
            server_part[key] = value
        if key not in engine_keys | server_keys:
            raise SystemExit(f"{path}: unknown setting {key!r}")
    return engine_part, server_part


def _read_preset(name_or_path: str) -> str:
    """The text of a preset: a YAML file, or the name of one shipped in `plm_serve.configs`."""
    if Path(name_or_path).is_file():
        return Path(name_or_path).read_text(encoding="utf-8")
    shipped = configs.serving_preset(name_or_path)
    if shipped is None:
        raise SystemExit(
            f"plm-serve: --config {name_or_path}: no such file, and no shipped preset of that name "
            f"(shipped: {', '.join(configs.serving_preset_names())})"
        )
    return shipped.read_text(encoding="utf-8")


def build_configs(args: argparse.Namespace, environ: dict[str, str]) -> ServerConfig:
    engine_part, server_part = load_preset(args.config)
    flags = {k: v for k, v in vars(args).items() if v is not None}
    engine_keys = {f.name for f in dataclasses.fields(EngineConfig)} - {"model"}
    engine_part.update({k: v for k, v in flags.items() if k in engine_keys})
    server_part.update({k: v for k, v in flags.items() if k in server_field_names() - {"model"}})
    if "api_key" not in server_part and environ.get("PLM_API_KEY"):
        server_part["api_key"] = environ["PLM_API_KEY"]
    model = args.model or server_part.pop("model", None) or engine_part.get("model")
    server_part.pop("model", None)
    if model is None:
        cache = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "plm-serve"
        model = str(ensure_demo_checkpoint(cache, VERSION))
        logger.warning(
            "No --model given: serving the built-in DEMO model from %s. Its weights are RANDOM, so its "
            "answers are meaningless. Pass --model /path/to/Perception-LM-1B to serve a real checkpoint.",
            model,
        )
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(
            f"plm-serve: --model {model}: not a checkpoint folder (no config.json); give the folder of a "
            "Perception-LM checkpoint in the Hugging Face format, or no --model for the demo model"
        )
    engine_part["model"] = model
    try:
        engine_config = EngineConfig(**engine_part)
        return ServerConfig(model=model, engine=engine_config, **server_part)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"plm-serve: {exc}") from None


class GracefulServer(uvicorn.Server):
    """On SIGTERM/SIGINT: stop accepting, let running requests finish for the grace period, abort the rest.

    uvicorn alone would wait for open streams indefinitely (or cut them mid-token at its timeout); draining
    the engine first lets every stream end properly, after which uvicorn's own connection wait completes.
    """

    def __init__(self, config: uvicorn.Config, grace_s: float) -> None:
        super().__init__(config)
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        draining = asyncio.ensure_future(drain(self.config.app, self.grace_s))  # type: ignore[arg-type]
        try:
            await super().shutdown(sockets)
        finally:
            await draining


def serve(config: ServerConfig, log_level: str = "info") -> int:
    server: GracefulServer | None = None

    def on_load_failure(exc: BaseException) -> None:
        if server is not None:
            server.should_exit = True  # a server that cannot load must not linger half-alive

    app = create_app(config, on_load_failure=on_load_failure)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        timeout_graceful_shutdown=int(config.shutdown_grace_seconds) + 5,  # a backstop behind drain()
    )
    server = GracefulServer(uv_config, config.shutdown_grace_seconds)
    server.run()
    return 1 if app.state.ctx.load_error else 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = build_configs(args, dict(os.environ))
    sys.exit(serve(config, args.log_level))


if __name__ == "__main__":
    main()
