"""End to end: a live uvicorn server on loopback with the real engine and the tiny checkpoint, driven by the
official `openai` client (sync and async, streaming and not), compared with the offline API; plus the CLI as a
user runs it (demo model, SIGTERM)."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from plm_serve.engine import AsyncEngine, EngineConfig, SamplingParams
from plm_serve.offline import LLM
from plm_serve.processors import ImageInput, Processor, VideoInput
from plm_serve.server.app import create_app
from plm_serve.server.config import ServerConfig
from tests.server import media
from tests.server.live_server import free_port, serving_in_thread, wait_healthy

MODEL = "plm-tiny"
ENGINE_ARGS = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 1024, "max_num_batched_tokens": 4096}
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Live:
    base_url: str
    engine: AsyncEngine
    processor: Processor

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def live(ckpt_l):
    engine = AsyncEngine.from_config(EngineConfig(model=str(ckpt_l), **ENGINE_ARGS))
    config = ServerConfig(
        model=str(ckpt_l),
        served_model_name=MODEL,
        allow_private_media_urls=True,  # the test's media server is on loopback
        max_request_body_bytes=2 * 1024 * 1024,
        report_cached_tokens=True,
    )
    app = create_app(config, engine)  # the lifespan loads the processor from the checkpoint
    try:
        with serving_in_thread(app) as base_url:
            yield Live(base_url, engine, app.state.ctx.processor)
    finally:
        asyncio.run(engine.shutdown(1.0))


@pytest.fixture(scope="module")
def offline(ckpt_l) -> LLM:
    return LLM(ckpt_l, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def media_server(tmp_path_factory):
    """A plain HTTP server on loopback serving test media (the server is started with private URLs allowed)."""
    root = tmp_path_factory.mktemp("media")
    (root / "photo.png").write_bytes(media.png(500, 450, seed=5))
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def offline_answer(offline: LLM, content, max_tokens: int = 8):
    (result,) = offline.chat([{"role": "user", "content": content}], SamplingParams(max_tokens=max_tokens))
    return result


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def test_text_chat_equals_the_offline_api_with_exact_usage(live, offline):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    resp = live.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    expected = offline_answer(offline, "Tell me about the sea.")
    choice = resp.choices[0]
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert resp.model == MODEL and resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.usage.prompt_tokens == len(live.processor.process_chat(messages).token_ids)
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_streamed_deltas_concatenate_to_the_non_streamed_text(live):
    client = live.client()
    messages = [{"role": "user", "content": "Count to five."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        full.choices[0].finish_reason
    ]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.completion_tokens == full.usage.completion_tokens
    # the same prompt again: its full KV blocks come from the prefix cache
    assert usage.prompt_tokens_details.cached_tokens > full.usage.prompt_tokens_details.cached_tokens


def test_image_by_data_url_async(live, offline):
    png = media.png(500, 450, seed=5)

    async def ask():
        async with live.async_client() as client:
            content = [media.image_part(media.data_url(png)), text_part("Describe the image.")]
            return await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8
            )

    resp = asyncio.run(ask())
    expected = offline_answer(offline, [ImageInput(png), text_part("Describe the image.")])
    assert resp.choices[0].message.content == expected.outputs[0].text
    counted = live.processor.process_chat(
        [{"role": "user", "content": [ImageInput(png), text_part("Describe the image.")]}]
    )
    assert resp.usage.prompt_tokens == len(counted.token_ids) == len(expected.prompt_token_ids)
    assert counted.media[0].length == 5 * 256  # max_num_tiles=4: thumbnail + 4 tiles


def test_image_by_http_url_matches_the_data_url(live, media_server):
    client = live.client()

    def ask(url: str):
        content = [media.image_part(url), text_part("Describe the image.")]
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8
        )

    by_url = ask(f"{media_server}/photo.png")
    by_data = ask(media.data_url(media.png(500, 450, seed=5)))
    assert by_url.choices[0].message.content == by_data.choices[0].message.content
    assert by_url.usage.prompt_tokens == by_data.usage.prompt_tokens
    assert by_url.usage.completion_tokens == by_data.usage.completion_tokens
    with pytest.raises(openai.BadRequestError):
        ask(f"{media_server}/missing.png")


def test_video_async_streaming(live, offline):
    video = media.mp4(num_frames=6, seed=2)

    async def ask():
        async with live.async_client() as client:
            content = [
                media.video_part(media.data_url(video, "video/mp4"), num_frames=2),
                text_part("What happens?"),
            ]
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": content}],
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
            return [chunk async for chunk in stream]

    chunks = asyncio.run(ask())
    expected = offline_answer(offline, [VideoInput(video, num_frames=2), text_part("What happens?")])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.outputs[0].text
    assert chunks[-1].usage.prompt_tokens == len(expected.prompt_token_ids)


def test_completions_endpoint_with_the_sync_client(live, offline):
    resp = live.client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6)
    (expected,) = offline.generate("Once upon a time", SamplingParams(max_tokens=6))
    assert resp.object == "text_completion" and resp.choices[0].text == expected.outputs[0].text
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_client_disconnect_mid_stream_frees_kv_blocks(live):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Go on forever."}],
        "stream": True,
        "max_tokens": 4000,
        "min_tokens": 4000,
        "ignore_eos": True,
    }
    received = 0
    with (
        httpx.Client(base_url=live.base_url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as resp,
    ):
        for line in resp.iter_lines():
            received += line.startswith("data: ")
            if received >= 5:
                break  # leaving the block closes the connection mid-stream
    core = live.engine.core
    deadline = time.monotonic() + 5
    while core.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not core.has_unfinished(), "the engine kept generating for a client that left"
    time.sleep(0.05)
    core.scheduler.check_integrity()  # every KV block is free or cached again
    assert core.scheduler.block_manager.usage == 0.0


def test_32_concurrent_requests_all_complete(live):
    prompts = [f"Question number {i % 4}?" for i in range(32)]

    async def ask_all():
        async with live.async_client() as client:
            return await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=4
                    )
                    for p in prompts
                )
            )

    results = asyncio.run(ask_all())
    assert len(results) == 32 and all(r.choices[0].finish_reason in ("stop", "length") for r in results)
    by_prompt: dict[str, set[str]] = {}
    for p, r in zip(prompts, results, strict=True):
        by_prompt.setdefault(p, set()).add(r.choices[0].message.content)
    assert all(
        len(answers) == 1 for answers in by_prompt.values()
    )  # greedy: batching does not change answers


def test_errors_through_the_live_server_then_it_still_answers(live):
    client = live.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    big = httpx.post(
        f"{live.base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 3_000_000}]},
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    undecodable = [media.image_part("data:image/png;base64,QUJDRA=="), text_part("?")]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": undecodable}])
    ok = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    assert ok.choices[0].message.content is not None
    metrics = httpx.get(f"{live.base_url}/metrics").text
    assert 'plm_http_requests_total{route="/v1/chat/completions",status="400"}' in metrics
    assert "plm_num_kv_blocks 1024.0" in metrics
    assert 'plm_internal_errors_total{cause="server"} 0.0' in metrics
    assert 'plm_internal_errors_total{cause="engine"} 0.0' in metrics


def test_cli_serves_the_demo_model_and_drains_on_sigterm(tmp_path):
    """The README's first command, as a user runs it: no --model, then SIGTERM during a long stream."""
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("PLM_API_KEY", None)
    cmd = [
        sys.executable,
        "-m",
        "plm_serve.server",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--shutdown-grace-seconds",
        "1",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, 120)
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        (model,) = client.models.list().data
        assert model.id.startswith("demo-")
        resp = client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert resp.usage.completion_tokens >= 1

        body = {"messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 100000 // 10}
        body.update(min_tokens=body["max_tokens"], ignore_eos=True)
        events: list[str] = []
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=30) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue  # the blank line after each event must not count as a second signal
                events.append(line[6:])
                if len(events) == 3:
                    proc.send_signal(signal.SIGTERM)  # once: a second signal means "exit now"
        assert proc.wait(timeout=30) == 0  # a drain, even one that had to abort, is a clean exit
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp_path / "server.log").read_text()
    assert "RANDOM" in output
    assert events[-1] == "[DONE]"  # the stream ended properly, not cut
    assert "aborted by the server" in json.dumps(events[-2])
