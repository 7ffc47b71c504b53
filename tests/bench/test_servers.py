"""The side-by-side run's server processes: started on loopback, ready at /health, stopped, logs read for notes;
and the exact command lines both servers get (same checkpoint, device, dtype; loopback only)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from bench.serving import servers

FAKE_SERVER = textwrap.dedent(
    """
    import http.server, sys
    print("[transformers] PerceptionLMForConditionalGeneration does not support continuous batching. "
          "Falling back to sequential generation.", flush=True)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    """
)


def test_a_started_server_is_waited_for_stopped_and_its_log_read(tmp_path):
    port = servers.free_port()
    proc = servers.ServerProcess(
        "fake",
        "transformers",
        [sys.executable, "-c", FAKE_SERVER, str(port)],
        port,
        "m",
        tmp_path / "fake.log",
    )
    with proc as started:
        assert started.proc.poll() is None
        target = started.target(request_timeout_s=5)
        assert (target.url, target.flavor, target.model) == (f"http://127.0.0.1:{port}", "transformers", "m")
        assert target.cpu_clock is not None and 0 < target.cpu_clock() < 60  # the server's own CPU time
    assert proc.proc.poll() is not None  # stopped on exit
    assert proc.notes() == [
        "PerceptionLMForConditionalGeneration does not support continuous batching. "
        "Falling back to sequential generation."
    ]


def test_a_server_that_dies_at_startup_fails_fast(tmp_path):
    port = servers.free_port()
    argv = [sys.executable, "-c", "import sys; print('no such model'); sys.exit(3)"]
    proc = servers.ServerProcess("dead", "vllm", argv, port, "m", tmp_path / "dead.log", startup_timeout_s=60)
    with pytest.raises(RuntimeError, match="exited with 3"):
        proc.__enter__()
    assert "no such model" in (tmp_path / "dead.log").read_text()


def test_a_server_that_never_gets_healthy_is_stopped(tmp_path):
    port = servers.free_port()
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    proc = servers.ServerProcess("mute", "vllm", argv, port, "m", tmp_path / "mute.log", startup_timeout_s=1)
    with pytest.raises(TimeoutError, match="not healthy"):
        proc.__enter__()
    assert proc.proc.poll() is not None


def test_both_servers_get_the_same_checkpoint_device_and_dtype_on_loopback(tmp_path):
    ckpt = Path("/models/plm")
    plm = servers.plm_serve(ckpt, "cuda", "bfloat16", tmp_path, ["--config", "plm-1b"])
    hf = servers.transformers_serve(ckpt, "cuda", "bfloat16", tmp_path, [])
    for proc in (plm, hf):
        argv = proc.argv
        assert str(ckpt) in argv and argv[argv.index("--host") + 1] == "127.0.0.1"
        assert argv[argv.index("--device") + 1] == "cuda" and argv[argv.index("--dtype") + 1] == "bfloat16"
        assert argv[argv.index("--port") + 1] == str(proc.port)
    assert plm.argv[-2:] == ["--config", "plm-1b"] and plm.flavor == "vllm" and plm.model_id == "plm-serve"
    assert "--continuous-batching" in hf.argv and hf.flavor == "transformers" and hf.model_id == str(ckpt)
