"""`plm-serve` / `python -m plm_serve.server`: flags over an optional YAML preset -> configs -> uvicorn.

This is the only module that reads the environment (`PLM_API_KEY`, and the cache location of the demo model).
Settings resolve in this order, last wins: the config dataclasses' defaults, the `--config` preset, CLI flags.
Every mistake in them ends the process with one line on stderr and exit status 2, never a traceback; `--help`
and `--version` import neither torch nor the web stack.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import typing
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from plm_serve.engine import EngineConfig
from plm_serve.processors import MediaLimits
from plm_serve.server.config import ServerConfig
from plm_serve.server.connections import head_deadline_protocol
from plm_serve.server.flags import SettingsError, add_flags, given_flags, settings
from plm_serve.server.logs import LOG_FORMATS, configure_logging, uvicorn_log_config
from plm_serve.server.presets import load_preset
from plm_serve.server.version import VERSION

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("plm_serve.server")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """One line instead of argparse's usage dump (which lists every flag)."""
        self.exit(2, f"{self.prog}: {message} (`{self.prog} --help` lists every flag)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="plm-serve",
        description="OpenAI-compatible server for PerceptionLM (/v1/chat/completions and more).",
    )
    parser.add_argument("--version", action="version", version=f"plm-serve {VERSION}")
    parser.add_argument(
        "--model", help="checkpoint folder; without it a tiny random-weight demo model is served"
    )
    parser.add_argument(
        "--config",
        help="serving preset: a YAML file, or the name of a shipped one (plm-1b, plm-3b, plm-8b, tiny-random); "
        "flags given here override it",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text lines, or one JSON object per line carrying the request id (for log collectors)",
    )
    add_flags(parser)
    return parser


def build_configs(args: argparse.Namespace, environ: dict[str, str]) -> ServerConfig:
    """The validated configs of a command line; any mistake raises SystemExit with one line."""
    try:
        return _build_configs(args, environ)
    except (SettingsError, ValueError) as exc:
        raise SystemExit(f"plm-serve: {exc}") from None


def _build_configs(args: argparse.Namespace, environ: dict[str, str]) -> ServerConfig:
    values: dict[str, Any] = load_preset(args.config) if args.config else {}
    preset_model = values.pop("model", None)
    values.update(given_flags(args))
    if "api_key" not in values and environ.get("PLM_API_KEY"):
        values["api_key"] = environ["PLM_API_KEY"]
    model = args.model or preset_model or _demo_model(environ)
    if not (Path(model) / "config.json").is_file():
        raise SettingsError(
            f"--model {model}: not a checkpoint folder (no config.json); give the folder of a "
            "Perception-LM checkpoint in the Hugging Face format, or no --model for the demo model"
        )
    groups: dict[str, dict[str, Any]] = {"engine": {}, "server": {}, "media": {}}
    for name, value in values.items():
        groups[settings()[name].group][name] = value
    engine = EngineConfig(model=model, **groups["engine"])
    if engine.device == "cuda":
        _require_cuda()
    return ServerConfig(model=model, engine=engine, media=MediaLimits(**groups["media"]), **groups["server"])


def _demo_model(environ: dict[str, str]) -> str:
    from plm_serve.server.demo import ensure_demo_checkpoint  # builds with torch: only when it is needed

    cache = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "plm-serve"
    model = str(ensure_demo_checkpoint(cache, VERSION))
    logger.warning(
        "No --model given: serving the built-in DEMO model from %s. Its weights are RANDOM, so its "
        "answers are meaningless. Pass --model /path/to/Perception-LM-1B to serve a real checkpoint.",
        model,
    )
    return model


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise SettingsError(
            f"--device cuda: no CUDA device is available (torch {torch.__version__}, {built}); "
            "use --device cpu, or auto to take a GPU when there is one"
        )


class GracefulServer(uvicorn.Server):
    """Shutdown in two stages.

    First SIGTERM/SIGINT: drain. The listener stays up, /health and new requests answer 503 (so a load
    balancer takes the instance out of rotation and clients retry elsewhere), running requests get the
    grace period to finish and are aborted after it (their streams still end properly). Then uvicorn closes
    the listener and the connections and runs the lifespan shutdown. A second signal forces the exit at once.

    Exit code (`serve`'s): 0 after a drain, 1 when forced or when the model failed to load. (uvicorn alone
    closes the listener at the first signal and re-raises the signal after shutdown, so the process would end
    "killed by SIGTERM".)
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float) -> None:
        """`app`: the application `config` serves (the one the drain acts on)."""
        super().__init__(config)
        self.app = app
        self.grace_s = grace_s
        self.signalled = False
        self.forced = False
        self._drain: asyncio.Future | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it only sets flags (the loop's next tick starts the drain; the 503s start at
        # once). Not calling super() also keeps uvicorn from re-raising the signal after shutdown.
        if self.signalled:
            logger.warning("second signal: exiting now, without waiting for running requests")
            self.forced = self.force_exit = self.should_exit = True
        else:
            from plm_serve.server.app import begin_draining  # already imported by serve(): a lookup

            logger.info("signal %d: draining (a second signal exits at once)", sig)
            self.signalled = True
            begin_draining(self.app)  # 503 from this moment, not from the loop's next tick

    async def on_tick(self, counter: int) -> bool:
        if self.signalled and self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit())
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        from plm_serve.server.app import drain

        try:
            await drain(self.app, self.grace_s)
        finally:
            self.should_exit = True


def serve(config: ServerConfig, log_level: str = "info", log_format: str = "text") -> int:
    from plm_serve.server.app import create_app  # the web stack and the engine: not needed for --help

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
        log_config=uvicorn_log_config(log_format),
        http=head_deadline_protocol(config.header_read_timeout_s),
        timeout_keep_alive=config.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works (call_later)
        timeout_graceful_shutdown=int(config.shutdown_grace_seconds) + 5,  # a backstop behind drain()
    )
    server = GracefulServer(uv_config, app, config.shutdown_grace_seconds)
    server.run()
    return 1 if app.state.ctx.load_error or server.forced else 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    config = build_configs(args, dict(os.environ))
    sys.exit(serve(config, args.log_level, args.log_format))


if __name__ == "__main__":
    main()
