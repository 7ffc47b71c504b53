"""The serving benchmark: load through the OpenAI API against any server, side by side (`bench/serve_bench.py`).

workload  named scenarios -> request sets (text, images at a size and `detail`, repeated images, video)
media     synthetic photos and videos, made in memory and sent as data: URLs
flavors   the per-server body fields that make every server emit exactly `max_tokens` tokens
client    one streamed chat request -> its timings (TTFT, chunk arrivals) and token counts
load      fixed-concurrency and Poisson-rate drivers, warm-up, progress bar
metrics   per-run summaries: requests/s, tok/s, TTFT / TPOT / ITL / E2E percentiles, errors by kind
servers   start plm-serve and `transformers serve` on loopback for a side-by-side run
report    results JSON, the ratio table and the markdown results file
plots     throughput vs concurrency, latency percentiles vs throughput (matplotlib)
"""
