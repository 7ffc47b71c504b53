"""The CLI's config resolution (defaults < preset < flags; PLM_API_KEY), the demo checkpoint cache, and draining
on shutdown (stop accepting, let running requests finish within the grace period, abort the rest)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import yaml

from plm_serve.server import __main__ as cli
from plm_serve.server import demo
from plm_serve.server.app import create_app, drain
from plm_serve.server.config import ServerConfig
from tests.server.conftest import MODEL_NAME, chat_body
from tests.server.fake_engine import FakeEngine

REPO = Path(__file__).resolve().parents[2]


def configs(argv: list[str], environ: dict[str, str] | None = None) -> ServerConfig:
    return cli.build_configs(cli.build_parser().parse_args(argv), environ or {})


def as_checkpoint(folder: Path) -> Path:
    """Make `folder` pass for a checkpoint (the CLI checks for config.json before anything loads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return as_checkpoint(tmp_path / "ckpt")


def test_a_model_path_that_is_no_checkpoint_exits_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        configs(["--model", str(tmp_path / "missing")])


def test_flags_override_the_preset_which_overrides_defaults(tmp_path, model_dir):
    preset = tmp_path / "p.yaml"
    preset.write_text(
        yaml.safe_dump({"max_num_seqs": 8, "dtype": "bfloat16", "port": 9000, "max_image_bytes": 10})
    )
    cfg = configs(
        ["--model", str(model_dir), "--config", str(preset), "--max-num-seqs", "4", "--host", "0.0.0.0"]
    )
    assert cfg.engine is not None and cfg.engine.model == cfg.model == str(model_dir)
    assert (cfg.engine.max_num_seqs, cfg.engine.dtype) == (4, "bfloat16")  # flag beats preset
    assert (cfg.host, cfg.port, cfg.max_image_bytes) == ("0.0.0.0", 9000, 10)
    assert cfg.engine.max_num_batched_tokens == 16384 and cfg.shutdown_grace_seconds == 30  # defaults
    assert cfg.model_name == model_dir.name


def test_sectioned_presets_and_served_model_name(tmp_path, model_dir):
    preset = tmp_path / "p.yaml"
    preset.write_text(
        yaml.safe_dump({"engine": {"num_kv_blocks": 64}, "server": {"served_model_name": "plm"}})
    )
    cfg = configs(["--model", str(model_dir), "--config", str(preset), "--no-enable-prefix-caching"])
    assert cfg.engine.num_kv_blocks == 64 and not cfg.engine.enable_prefix_caching
    assert cfg.model_name == "plm"


def test_api_key_from_flag_or_environment(model_dir):
    assert configs(["--model", str(model_dir)], {"PLM_API_KEY": "env-key"}).api_key == "env-key"
    assert configs(["--model", str(model_dir), "--api-key", "flag"], {"PLM_API_KEY": "env"}).api_key == "flag"
    assert configs(["--model", str(model_dir)]).api_key is None


def test_bad_settings_exit_with_a_message(tmp_path, model_dir):
    preset = tmp_path / "p.yaml"
    preset.write_text("max_num_sequences: 3\n")
    with pytest.raises(SystemExit, match="unknown setting"):
        configs(["--model", str(model_dir), "--config", str(preset)])
    with pytest.raises(SystemExit, match="max_num_seqs"):
        configs(["--model", str(model_dir), "--max-num-seqs", "0"])
    with pytest.raises(SystemExit, match="allowed_local_media_path"):
        configs(["--model", str(model_dir), "--allowed-local-media-path", str(tmp_path / "nope")])


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_presets_load(preset, model_dir):
    cfg = configs(["--model", str(model_dir), "--config", str(preset)])
    assert cfg.engine is not None


def test_demo_checkpoint_is_built_once_per_version(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "write_demo_model", lambda folder, seed: calls.append(("model", seed)))
    monkeypatch.setattr(demo, "write_processor_files", lambda folder: calls.append(("processor", None)))
    folder = demo.ensure_demo_checkpoint(tmp_path, "1.2.3")
    assert folder == tmp_path / "demo-1.2.3" and (folder / ".complete").exists()
    assert demo.ensure_demo_checkpoint(tmp_path, "1.2.3") == folder
    assert calls == [("model", 0), ("processor", None)]  # seeded, and only once
    assert [p.name for p in tmp_path.iterdir()] == ["demo-1.2.3"]  # no temporary folder left behind


def test_no_model_serves_the_demo_and_says_its_weights_are_random(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(
        cli, "ensure_demo_checkpoint", lambda root, version: as_checkpoint(root / f"demo-{version}")
    )
    with caplog.at_level("WARNING"):
        cfg = configs([], {"XDG_CACHE_HOME": str(tmp_path)})
    assert cfg.model == str(tmp_path / "plm-serve" / f"demo-{cli.VERSION}")
    assert "RANDOM" in caplog.text


async def _drain_scenario(app, grace_s: float) -> tuple[str, int, int]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        running = asyncio.ensure_future(
            client.post("/v1/chat/completions", json=chat_body("Hi", stream=True, max_tokens=10))
        )
        engine = app.state.ctx.engine
        while not engine.running:  # until the stream is under way in the engine
            await asyncio.sleep(0.01)
        draining = asyncio.ensure_future(drain(app, grace_s))
        await asyncio.sleep(0.02)
        health = (await client.get("/health")).status_code
        refused = (await client.post("/v1/chat/completions", json=chat_body("new"))).status_code
        text = (await running).text
        await draining
    return text, health, refused


@pytest.mark.parametrize("grace_s", [5.0, 0.1])
def test_drain_finishes_running_requests_within_the_grace_period(ckpt_l, processor, grace_s):
    engine = FakeEngine(step_delay_s=0.05)  # 10 tokens take 0.5 s
    app = create_app(
        ServerConfig(model=str(ckpt_l), served_model_name=MODEL_NAME), engine, processor=processor
    )
    text, health, refused = asyncio.run(_drain_scenario(app, grace_s))
    assert health == 503 and refused == 503
    assert text.endswith("data: [DONE]\n\n")
    if grace_s > 1:
        assert '"finish_reason":"length"' in text and '"error"' not in text  # finished normally
    else:
        assert "aborted by the server" in text  # cut at the deadline, but the stream still ends properly
    assert engine.shutdown_calls == [grace_s] and engine.running == set()


def test_hardening_flags_reach_the_server_config(model_dir):
    cfg = configs(
        ["--model", str(model_dir), "--max-n", "4", "--default-max-tokens", "0", "--max-tokens-limit", "100",
         "--max-logprobs", "5", "--report-cached-tokens", "--no-prefix-cache-per-api-key",
         "--control-tokens-in-messages", "--max-text-request-body-bytes", "2048", "--request-read-timeout-s", "3",
         "--header-read-timeout-s", "2", "--keep-alive-timeout-s", "1.5", "--max-prompts-per-request", "3"]
    )  # fmt: skip
    assert (cfg.max_n, cfg.default_max_tokens, cfg.max_tokens_limit, cfg.max_logprobs) == (4, None, 100, 5)
    assert cfg.report_cached_tokens and not cfg.prefix_cache_per_api_key and cfg.control_tokens_in_messages
    assert (cfg.max_text_request_body_bytes, cfg.request_read_timeout_s, cfg.header_read_timeout_s) == (
        2048,
        3,
        2,
    )
    assert (cfg.keep_alive_timeout_s, cfg.max_prompts_per_request) == (1.5, 3)
    defaults = configs(["--model", str(model_dir)])
    assert (defaults.max_n, defaults.default_max_tokens, defaults.report_cached_tokens) == (16, 2048, False)
    assert defaults.prefix_cache_per_api_key and not defaults.control_tokens_in_messages
    with pytest.raises(SystemExit, match="max_n"):
        configs(["--model", str(model_dir), "--max-n", "500"])
