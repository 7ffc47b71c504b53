"""Per-request caps the operator sets (ServerConfig), so that one request cannot monopolise a shared server, and
the prefix-cache salt that keeps tenants apart. Each cap, when exceeded, is a 400 that names the limit and the
flag that sets it."""

from __future__ import annotations

import dataclasses
import hashlib

from plm_serve.engine import SamplingParams
from plm_serve.server.config import ServerConfig
from plm_serve.server.errors import bad_request


def check_caps(
    params: SamplingParams,
    config: ServerConfig,
    *,
    num_prompts: int = 1,
    logprobs_param: str = "top_logprobs",
) -> None:
    """400 when the request asks for more choices, prompts, alternatives or output tokens than allowed."""
    if num_prompts > config.max_prompts_per_request:
        raise bad_request(
            f"{num_prompts} prompts in one request; this server's limit is {config.max_prompts_per_request} "
            "(--max-prompts-per-request)",
            param="prompt",
        )
    choices = params.n * num_prompts
    if choices > config.max_n:
        per = f" ({params.n} per prompt x {num_prompts} prompts)" if num_prompts > 1 else ""
        raise bad_request(
            f"{choices} choices{per} in one request; this server's limit is {config.max_n} (--max-n)",
            param="n",
        )
    if params.logprobs is not None and params.logprobs > config.max_logprobs:
        raise bad_request(
            f"{logprobs_param}={params.logprobs} is over this server's limit of {config.max_logprobs} "
            "(--max-logprobs)",
            param=logprobs_param,
        )
    limit = config.max_tokens_limit
    if limit is not None and params.max_tokens is not None and params.max_tokens > limit:
        raise bad_request(
            f"max_tokens={params.max_tokens} is over this server's limit of {limit} (--max-tokens-limit)",
            param="max_tokens",
        )


def with_output_budget(
    params: SamplingParams, num_prompt_tokens: int, max_model_len: int, config: ServerConfig
) -> SamplingParams:
    """`params` with max_tokens set when the request gave none: the operator's default (and cap), never more
    than the context leaves after the prompt. Unchanged when max_tokens was given."""
    if params.max_tokens is not None:
        return params
    room = max_model_len - num_prompt_tokens
    budgets = [b for b in (config.default_max_tokens, config.max_tokens_limit) if b is not None]
    if not budgets:
        return params  # up to the context length (the engine's None)
    budget = min(min(budgets), room)
    if params.min_tokens > budget:
        raise bad_request(
            f"min_tokens={params.min_tokens} is more than this request can generate ({budget} tokens: the "
            "context left after the prompt, and the server's default max_tokens); give max_tokens",
            param="min_tokens",
        )
    return dataclasses.replace(params, max_tokens=max(budget, 1))


def request_cache_salt(
    request_salt: str | None, authorization: str | None, config: ServerConfig
) -> str | None:
    """The engine's cache salt: the bearer token's hash (with `prefix_cache_per_api_key`) and the request's own
    `cache_salt`, combined. None when neither applies: the shared cache."""
    parts = []
    if config.prefix_cache_per_api_key and authorization:
        digest = hashlib.sha256(authorization.encode("utf-8", "surrogateescape")).hexdigest()
        parts.append(f"key:{digest}")
    if request_salt:
        parts.append(f"request:{request_salt}")
    return "|".join(parts) or None
