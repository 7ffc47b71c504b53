"""How each kind of server is asked to generate exactly `max_tokens` tokens, greedily, as a stream.

Random-weight checkpoints stop at an end-of-sequence token whenever one happens to win, so without help two
servers would generate different amounts of work. There is no OpenAI field for "do not stop early"; each server
family has its own:

- `vllm`: `ignore_eos: true` (plm-serve, vLLM, SGLang) and `stream_options.include_usage` for exact counts.
- `transformers`: `transformers serve` refuses unknown fields with a 422, but accepts a `generation_config` JSON
  string; `min_new_tokens` = `max_new_tokens` masks EOS until the length is reached. It always sends usage in
  its last chunk and ignores `stream_options` with a warning, so none is sent.
- `openai`: standard fields only: replies may end early at EOS (the results count such short replies).
"""

from __future__ import annotations

import json

from bench.serving.workload import RequestSpec

FLAVORS = {
    "vllm": "ignore_eos=true, stream_options.include_usage",
    "transformers": "generation_config={min_new_tokens=max_new_tokens=max_tokens, do_sample=false}",
    "openai": "standard fields only (replies may stop early at EOS)",
}


def request_body(flavor: str, model: str, spec: RequestSpec) -> dict:
    """The streamed /v1/chat/completions body for `spec` on a server of `flavor`."""
    body = {
        "model": model,
        "messages": spec.messages,
        "max_tokens": spec.max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    if flavor == "vllm":
        body["ignore_eos"] = True
        body["stream_options"] = {"include_usage": True}
    elif flavor == "transformers":
        n = spec.max_tokens
        body["generation_config"] = json.dumps({"max_new_tokens": n, "min_new_tokens": n, "do_sample": False})
    elif flavor == "openai":
        body["stream_options"] = {"include_usage": True}
    else:
        raise ValueError(f"unknown flavor {flavor!r} (known: {', '.join(FLAVORS)})")
    return body
