"""The benchmark command end to end, briefly: two targets (the same live loopback server under two names), text,
low-detail images and video, a concurrency point and a Poisson point; then the files it writes."""

from __future__ import annotations

import json

from bench import serve_bench
from tests.bench.conftest import MODEL


def test_run_writes_json_table_and_plot_with_exact_lengths(live_url, tmp_path, capsys):
    paths = serve_bench.main(
        [
            "run",
            "--target",
            f"{live_url},name=first",
            "--target",
            f"{live_url}/v1,name=second,model={MODEL}",
            "--scenario",
            "text-chat,image-low,video-short",
            "--concurrency",
            "3",
            "--rate",
            "50",
            "--num-requests",
            "4",
            "--warmup",
            "1",
            "--max-output-tokens",
            "6",
            "--media-output-tokens",
            "5",
            "--image-size",
            "96x64",
            "--video-frames",
            "2",
            "--video-size",
            "64x48",
            "--label",
            "test",
            "--out-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert sorted(p.suffix for p in paths) == [".json", ".md", ".png"]
    results = json.loads(paths[0].read_text())
    assert [t["model"] for t in results["targets"]] == [MODEL, MODEL]  # the first asked GET /v1/models
    runs = results["runs"]
    assert len(runs) == 3 * 2 * 2  # scenarios x load points x targets
    for run in runs:
        s = run["summary"]
        assert (s["completed"], s["failed"], s["cancelled"], s["unsent"]) == (4, 0, 0, 0), run
        assert s["short_replies"] == 0  # ignore_eos: every reply as long as asked
        assert s["ttft_ms"]["p50"] > 0 and s["itl_ms"]["p99"] >= s["itl_ms"]["p50"] > 0
        assert s["request_throughput"] > 0 and s["output_throughput"] > 0
    by_scenario = {
        r["scenario"]: r["summary"] for r in runs if r["target"] == "first" and r["mode"] == "rate"
    }
    assert by_scenario["image-low"]["mean_output_tokens"] == 5
    # one 448 tile (256 rows) for a low-detail image; 2 frames of 256 rows for the video
    assert by_scenario["image-low"]["mean_prompt_tokens"] > 256
    assert by_scenario["video-short"]["mean_prompt_tokens"] > 2 * 256
    table = paths[-1].read_text()
    assert (
        "| first vs second | image-low | c=3 |" in table
        and "| first vs second | text-chat | 50 req/s |" in table
    )
    assert "first vs second" in capsys.readouterr().out
    assert paths[1].stat().st_size > 10_000  # a real PNG was drawn

    # `report` draws the same files again from the JSON alone
    again = serve_bench.main(["report", str(paths[0]), "--no-plot"])
    assert again[-1].read_text() == table.replace(f"\n\n![throughput and latency]({paths[1].name})", "")
