"""The CLI's config resolution (defaults < preset < flags; PLM_API_KEY), the demo checkpoint cache, and draining
on shutdown (stop accepting, let running requests finish within the grace period, abort the rest)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from plm_serve.server import __main__ as cli
from plm_serve.server import demo
from plm_serve.server.app import create_app, drain
from plm_serve.server.config import ServerConfig
from plm_serve.server.flags import settings
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
    assert (cfg.host, cfg.port, cfg.media.max_image_bytes) == ("0.0.0.0", 9000, 10)
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


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("max_num_sequences: 3\n", "unknown setting 'max_num_sequences'; did you mean 'max_num_seqs'"),
        ("max_num_seqs: [1\n", r"p.yaml: .*\(line 2, column 1\)"),
        ("- 1\n- 2\n", "expected a mapping of settings, got list"),
        ("max_num_seqs: lots\n", "max_num_seqs must be an integer, got 'lots'"),
        ("enable_prefix_caching: 1\n", "enable_prefix_caching must be true or false"),
        ("dtype: fp8\n", "dtype='fp8': use one of auto, float32, bfloat16, float16"),
        ("gpu_memory_utilization: .nan\n", "gpu_memory_utilization must be a finite number"),
        ("engine: 3\n", "the `engine:` section must be a mapping"),
        ("port: 70000\n", "port=70000: use 0..65535"),
    ],
)
def test_preset_mistakes_exit_with_one_clear_line(tmp_path, model_dir, text, match):
    preset = tmp_path / "p.yaml"
    preset.write_text(text)
    with pytest.raises(SystemExit, match=match):
        configs(["--model", str(model_dir), "--config", str(preset)])


def test_a_missing_preset_names_the_shipped_ones(model_dir):
    with pytest.raises(SystemExit, match=r"no such file, and no shipped preset .*plm-1b, plm-3b"):
        configs(["--model", str(model_dir), "--config", "plm-2b"])


def test_shipped_presets_load_by_name(model_dir):
    cfg = configs(["--model", str(model_dir), "--config", "plm-1b"])
    assert cfg.engine is not None and cfg.engine.dtype == "bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
def test_device_cuda_without_a_gpu_exits_with_a_message(model_dir):
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device is available"):
        configs(["--model", str(model_dir), "--device", "cuda"])


def test_every_setting_is_a_documented_flag():
    help_text = cli.build_parser().format_help()
    for setting in settings().values():
        assert setting.doc, f"{setting.name} has no docstring (it is the flag's help)"
        assert setting.flag in help_text


def test_help_and_version_import_neither_torch_nor_the_web_stack():
    code = (
        "import sys; from plm_serve.server.__main__ import build_parser; build_parser().format_help(); "
        "heavy = {'torch', 'fastapi', 'plm_serve.engine.core'} & set(sys.modules); print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    version = subprocess.run(
        ["plm-serve", "--version"], capture_output=True, text=True, check=True, env=_path_env()
    )
    assert version.stdout.strip() == f"plm-serve {cli.VERSION}"


def test_a_cli_mistake_is_one_line_on_stderr_without_a_traceback(tmp_path):
    out = subprocess.run(
        ["plm-serve", "--model", str(tmp_path), "--port", "1"],
        capture_output=True,
        text=True,
        env=_path_env(),
    )
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "not a checkpoint folder" in out.stderr


def _path_env() -> dict[str, str]:
    """The environment with this interpreter's scripts folder (holding `plm-serve`) first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_bad_settings_exit_with_a_message(tmp_path, model_dir):
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
        demo, "ensure_demo_checkpoint", lambda root, version: as_checkpoint(root / f"demo-{version}")
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
        ["--model", str(model_dir), "--max-n", "4", "--default-max-tokens", "none", "--max-tokens-limit", "100",
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
