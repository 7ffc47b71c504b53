"""Scenarios make the same requests for the same seed, distinct ones otherwise, with the media they promise;
flavors turn them into the body each server needs for exact lengths; plans read and validate."""

from __future__ import annotations

import base64
import io
import json

import av
import numpy as np
import pytest
from PIL import Image

from bench.serving import plan as plans
from bench.serving.flavors import request_body
from bench.serving.workload import SCENARIOS, WorkloadOptions, build_requests

SMALL = WorkloadOptions(image_width=96, image_height=64, video_frames=3, video_width=64, video_height=48)


def parts(spec, kind: str) -> list[dict]:
    return [p for p in spec.messages[0]["content"] if isinstance(p, dict) and p["type"] == kind]


def decoded(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_seed_same_requests_other_seed_other_requests(name):
    a, b = build_requests(name, 6, SMALL, seed=1), build_requests(name, 6, SMALL, seed=1)
    c = build_requests(name, 6, SMALL, seed=2)
    assert len(a) == 6 and a == b
    assert json.dumps([s.messages for s in a]) != json.dumps([s.messages for s in c])


def test_image_scenarios_send_detail_and_the_chosen_size():
    for name, detail, count in (
        ("image-high", "high", 1),
        ("image-low", "low", 1),
        ("multi-image", "low", 3),
    ):
        for spec in build_requests(name, 3, SMALL, seed=0):
            images = parts(spec, "image_url")
            assert len(images) == count and {p["image_url"]["detail"] for p in images} == {detail}
            assert spec.max_tokens == SMALL.media_output_tokens
            with Image.open(io.BytesIO(decoded(images[0]["image_url"]["url"]))) as img:
                assert (img.format, img.size) == ("JPEG", (96, 64))
    urls = [
        parts(s, "image_url")[0]["image_url"]["url"] for s in build_requests("image-high", 4, SMALL, seed=0)
    ]
    assert len(set(urls)) == 4  # distinct images: no cache can answer for another request


def test_image_repeat_cycles_a_small_pool_with_different_questions():
    specs = build_requests(
        "image-repeat", 6, WorkloadOptions(repeat_pool=2, image_width=64, image_height=64), 0
    )
    urls = [parts(s, "image_url")[0]["image_url"]["url"] for s in specs]
    assert len(set(urls)) == 2 and urls[0] == urls[2] == urls[4]
    assert len({parts(s, "text")[0]["text"] for s in specs}) == 6


def test_video_is_a_decodable_mp4_of_the_chosen_length():
    (spec,) = build_requests("video-short", 1, SMALL, seed=0)
    (video,) = parts(spec, "video_url")
    with av.open(io.BytesIO(decoded(video["video_url"]["url"]))) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (48, 64, 3)


def test_text_chat_lengths_are_long_tailed_and_capped():
    specs = build_requests("text-chat", 400, WorkloadOptions(max_output_tokens=300), seed=0)
    prompt_words = np.array([len(s.messages[0]["content"].split()) for s in specs])
    replies = np.array([s.max_tokens for s in specs])
    assert 120 < np.median(prompt_words) < 260 and prompt_words.max() > 3 * np.median(prompt_words)
    assert replies.max() == 300 and replies.min() >= 8 and 100 < np.median(replies) < 220


def test_mix_draws_every_kind():
    kinds = {s.scenario for s in build_requests("mix", 60, SMALL, seed=0)}
    assert kinds == {"text-chat", "image-low", "image-repeat", "image-high", "video-short"}


def test_flavors_ask_each_server_for_exact_lengths_in_its_own_way():
    (spec,) = build_requests("image-low", 1, SMALL, seed=0)
    vllm = request_body("vllm", "m", spec)
    assert vllm["ignore_eos"] is True and vllm["stream_options"] == {"include_usage": True}
    hf = request_body("transformers", "/ckpt", spec)
    assert "ignore_eos" not in hf and "stream_options" not in hf  # transformers serve: 422 / ignored
    assert json.loads(hf["generation_config"]) == {
        "max_new_tokens": 64,
        "min_new_tokens": 64,
        "do_sample": False,
    }
    plain = request_body("openai", "m", spec)
    assert "ignore_eos" not in plain and "generation_config" not in plain
    for body in (vllm, hf, plain):
        assert body["stream"] is True and body["max_tokens"] == spec.max_tokens and body["temperature"] == 0.0
    with pytest.raises(ValueError, match="unknown flavor"):
        request_body("sglang", "m", spec)


def test_shipped_plans_are_valid():
    assert {"cpu", "gpu"} <= set(plans.shipped_plans())
    for name in plans.shipped_plans():
        plan = plans.build_plan(plans.read_plan(name))
        assert plan.scenarios and all(sp.points and sp.num_requests > 0 for sp in plan.scenarios)


def test_plan_overrides_and_selection():
    raw = {"defaults": {"concurrency": [1, 2]}, "scenarios": {"text-chat": {"rate": [3]}, "image-low": {}}}
    plan = plans.build_plan(
        raw, only=["text-chat"], overrides={"num_requests": 5}, workload_overrides={"repeat_pool": 7}
    )
    (sp,) = plan.scenarios
    assert (sp.name, sp.num_requests) == ("text-chat", 5)
    assert [(p.mode, p.value) for p in sp.points] == [("concurrency", 1), ("concurrency", 2), ("rate", 3)]
    assert plan.workload.repeat_pool == 7
    with pytest.raises(SystemExit, match="unknown scenario"):
        plans.build_plan(raw, only=["text"])
    with pytest.raises(SystemExit, match="unknown settings"):
        plans.build_plan({"scenarios": {"text-chat": {"concurency": [1]}}})
