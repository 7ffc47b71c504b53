"""POST /tokenize and POST /detokenize in vLLM's shapes, and the prompt token count of a chat request.

/tokenize takes `prompt` (text, tokenized as /v1/completions does: BOS added unless `add_special_tokens` is
false) or `messages` (rendered as /v1/chat/completions renders them, media fetched and counted as placeholder
tokens, `tools` shown as the chat endpoint shows them) and returns `{"count", "max_model_len", "tokens",
"token_strs"}`; /detokenize takes `tokens` and returns `{"prompt"}`.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from plm_serve.engine import EngineClient
from plm_serve.processors import ProcessedPrompt
from plm_serve.server.deps import ServerContext
from plm_serve.server.errors import bad_request
from plm_serve.server.protocol import ChatMessage
from plm_serve.server.protocol_base import OpenAIBaseModel
from plm_serve.server.protocol_tools import ChatTool
from plm_serve.server.request_common import load_messages
from plm_serve.server.tools import chat_tool_plan


class TokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    tools: list[ChatTool] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = (
        None  # default: True for a prompt, False for messages (the template has BOS)
    )
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


async def tokenize(body: TokenizeRequest, ctx: ServerContext, engine: EngineClient) -> JSONResponse:
    processor = ctx.processor
    assert processor is not None
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give either prompt or messages", param="prompt")
    if body.prompt is not None:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = processor.tokenizer.encode(body.prompt, add_special_tokens=special).ids
    else:
        assert body.messages is not None
        if body.add_special_tokens:
            raise bad_request(
                "the chat template adds the special tokens of messages", param="add_special_tokens"
            )
        plan = chat_tool_plan(body.tools, None, None)
        messages = await load_messages(body.messages, ctx)
        process = functools.partial(
            processor.process_chat,
            messages,
            tools=plan.prompt_tools,
            add_generation_prompt=body.add_generation_prompt,
        )
        prompt: ProcessedPrompt = await asyncio.get_running_loop().run_in_executor(ctx.executor, process)
        ids = prompt.token_ids
    strs = [processor.tokenizer.id_to_token(i) or "" for i in ids] if body.return_token_strs else None
    response = TokenizeResponse(
        count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs
    )
    return JSONResponse(response.model_dump(mode="json"))


def detokenize(body: DetokenizeRequest, ctx: ServerContext) -> JSONResponse:
    assert ctx.processor is not None
    vocab = ctx.processor.tokenizer.get_vocab_size()
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
    text = ctx.processor.tokenizer.decode(body.tokens, skip_special_tokens=False)
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump())
