"""OpenAI wire models (the only pydantic in the project).

Request fields follow the order of the OpenAI API reference
(https://platform.openai.com/docs/api-reference/chat/create and .../completions/create); extensions that
OpenAI lacks (vLLM's names) sit between the `# --- extensions` markers. Unknown fields are accepted and
logged, never rejected, so that clients sending newer OpenAI fields keep working. Conversions to engine types
live on the request (`to_sampling_params()`).

Validation is strict and bounded, because the body is untrusted: no coercion (`"max_tokens": "4"` and
`"n": true` are 400s, not 4 and 1), no NaN or infinities, every integer within the type the engine stores it
in, every list and string of a bounded length. (Strict JSON itself, lone surrogates included, is checked
before this, in `strict_json.py`.)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator

from plm_serve.engine import SamplingParams
from plm_serve.server.errors import bad_request
from plm_serve.server.protocol_base import OpenAIBaseModel
from plm_serve.server.protocol_tools import (
    ChatTool,
    OmitWhenNone,
    PromptLogprob,
    ResponseFormat,
    StructuredOutputsOptions,
    ToolCallDelta,
    ToolCallIn,
    ToolCallOut,
    ToolChoice,
)

logger = logging.getLogger(__name__)


# Bounds of the values the engine stores (int32 counts and ids, int64 seeds) and of what one request may hold.
MAX_INT32 = 2**31 - 1
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Count = Annotated[int, Field(ge=1, le=MAX_INT32)]
TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]
ShortStr = Annotated[str, Field(max_length=256)]
StopStr = Annotated[str, Field(min_length=1, max_length=1024)]
Stop = StopStr | Annotated[list[StopStr], Field(max_length=32)]
LogitBias = Annotated[dict[str, float], Field(max_length=1024)]
StopTokenIds = Annotated[list[TokenId], Field(max_length=1024)]
CacheSalt = Annotated[str, Field(min_length=1, max_length=256)]
MAX_MESSAGES = 4096  # each message costs template tokens: more cannot fit any PLM context (11520)
MAX_PARTS = 4096
MAX_PROMPT_TOKENS = 1 << 17  # a token-id prompt longer than this cannot fit any context


# -------------------------------------------------------------------------------------------- content parts
class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ImageURL(OpenAIBaseModel):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"
    # --- extensions
    max_num_tiles: Count | None = None
    # --- end of extensions


class ImageURLPart(OpenAIBaseModel):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        # Some clients send `"image_url": "https://..."` instead of an object; accept both.
        return {"url": value} if isinstance(value, str) else value


class VideoURL(OpenAIBaseModel):
    url: str
    # --- extensions (frame sampling; defaults come from the server's media limits)
    num_frames: Count | None = None
    fps: Annotated[float, Field(gt=0)] | None = None
    # --- end of extensions


class VideoURLPart(OpenAIBaseModel):
    type: Literal["video_url"]
    video_url: VideoURL

    @field_validator("video_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value


ContentPart = Annotated[TextPart | ImageURLPart | VideoURLPart, Field(discriminator="type")]


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None = None
    name: ShortStr | None = None
    tool_calls: Annotated[list[ToolCallIn], Field(max_length=128)] | None = None  # an assistant turn's calls
    tool_call_id: ShortStr | None = None  # a tool result: the call it answers


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class _SamplingMixin:
    """Maps the sampling fields both endpoints share onto the engine's SamplingParams (fields live on each
    model, in OpenAI's order)."""

    if TYPE_CHECKING:  # declared (in OpenAI's order) by each request model; pydantic must not see them here
        model_fields: ClassVar[dict[str, Any]]
        frequency_penalty: float | None
        logit_bias: dict[str, float] | None
        n: int | None
        presence_penalty: float | None
        seed: int | None
        stop: str | list[str] | None
        stream: bool | None
        stream_options: StreamOptions | None
        temperature: float | None
        top_p: float | None
        top_k: int | None
        min_p: float | None
        repetition_penalty: float | None
        min_tokens: int | None
        ignore_eos: bool | None
        stop_token_ids: list[int] | None
        skip_special_tokens: bool | None
        cache_salt: str | None

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _max_tokens(self) -> int | None:
        raise NotImplementedError

    def _num_logprobs(self) -> int | None:
        raise NotImplementedError

    def to_sampling_params(self, vocab_size: int) -> SamplingParams:
        """The engine's SamplingParams. Unset temperature means greedy (PLM's generation_config is greedy)."""
        temperature = 0.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        if top_p == 0.0:  # the nucleus shrinks to the single best token: greedy
            temperature, top_p = 0.0, 1.0
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stop):
            raise bad_request("stop strings must not be empty", param="stop")
        stop_token_ids = list(self.stop_token_ids or [])
        _check_token_ids(stop_token_ids, vocab_size, "stop_token_ids")
        if self.top_k is not None and self.top_k > vocab_size:
            raise bad_request(f"top_k must be at most the vocabulary size ({vocab_size})", param="top_k")
        try:
            return SamplingParams(
                max_tokens=self._max_tokens(),
                min_tokens=self.min_tokens or 0,
                temperature=temperature,
                top_p=top_p,
                top_k=max(self.top_k or 0, 0),  # -1 (vLLM) and 0 both disable it
                min_p=self.min_p or 0.0,
                seed=self.seed,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                logit_bias=_logit_bias(self.logit_bias, vocab_size),
                stop=stop,
                stop_token_ids=stop_token_ids,
                ignore_eos=bool(self.ignore_eos),
                n=self.num_choices,
                logprobs=self._num_logprobs(),
                skip_special_tokens=True if self.skip_special_tokens is None else self.skip_special_tokens,
            )
        except (
            ValueError
        ) as exc:  # SamplingParams' own cross-field checks ("min_tokens must be <= max_tokens")
            field = str(exc).split(" ", 1)[0]
            raise bad_request(str(exc), param=field if field in type(self).model_fields else None) from exc


# Field types shared by both requests (constraints give pydantic's 400 with `param` set).
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
NumChoices = Annotated[int, Field(ge=1, le=128)]  # OpenAI's maximum; the server's --max-n applies on top
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Count
NonNegativeInt = Annotated[int, Field(ge=0, le=MAX_INT32)]
TopK = Annotated[int, Field(ge=-1, le=MAX_INT32)]
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=100.0)]
NumLogprobs = Annotated[int, Field(ge=0, le=20)]


def _check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise bad_request(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", param=param)


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not -100.0 <= value <= 100.0:
            raise bad_request(f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
        _check_token_ids([token_id], vocab_size, "logit_bias")
        out[token_id] = float(value)
    return out


# ------------------------------------------------------------------------------------------------ requests
class ChatCompletionRequest(_SamplingMixin, OpenAIBaseModel):
    """POST /v1/chat/completions, fields in the order of OpenAI's reference."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    model: ShortStr | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    logprobs: bool | None = False
    max_completion_tokens: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    n: NumChoices | None = None
    parallel_tool_calls: bool | None = None
    presence_penalty: Penalty | None = None
    response_format: ResponseFormat | None = None
    seed: Int64 | None = None
    stop: Stop | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    tool_choice: ToolChoice | None = None
    tools: Annotated[list[ChatTool], Field(max_length=128)] | None = None
    top_logprobs: NumLogprobs | None = None
    top_p: Probability | None = None
    user: Annotated[str, Field(max_length=1024)] | None = None
    # --- extensions (vLLM names)
    top_k: TopK | None = None
    min_p: Probability | None = None
    repetition_penalty: RepetitionPenalty | None = None
    min_tokens: NonNegativeInt | None = None
    ignore_eos: bool | None = None
    stop_token_ids: StopTokenIds | None = None
    skip_special_tokens: bool | None = None
    prompt_logprobs: NumLogprobs | None = None
    structured_outputs: StructuredOutputsOptions | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    cache_salt: CacheSalt | None = None
    # --- end of extensions

    def _max_tokens(self) -> int | None:
        # max_completion_tokens supersedes the deprecated max_tokens; unset -> up to the context length.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_supported(self) -> None:
        """Reject features this server does not implement instead of silently ignoring them (tools and
        structured outputs are checked where they are planned: server/tools.py, server/structured.py)."""


class CompletionRequest(_SamplingMixin, OpenAIBaseModel):
    """POST /v1/completions (legacy), fields in the order of OpenAI's reference. `prompt` is a string, a list
    of strings, token ids, or lists of token ids."""

    model: ShortStr | None = None
    prompt: (
        str
        | Annotated[list[str], Field(max_length=MAX_PARTS)]
        | Annotated[list[TokenId], Field(max_length=MAX_PROMPT_TOKENS)]
        | Annotated[
            list[Annotated[list[TokenId], Field(max_length=MAX_PROMPT_TOKENS)]], Field(max_length=MAX_PARTS)
        ]
    )
    best_of: NumChoices | None = None
    echo: bool | None = False
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    logprobs: NumLogprobs | None = None
    max_tokens: NonNegativeInt | None = None  # 0 only with echo: score the prompt, generate nothing
    n: NumChoices | None = None
    presence_penalty: Penalty | None = None
    seed: Int64 | None = None
    stop: Stop | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    user: Annotated[str, Field(max_length=1024)] | None = None
    # --- extensions (vLLM names)
    top_k: TopK | None = None
    min_p: Probability | None = None
    repetition_penalty: RepetitionPenalty | None = None
    min_tokens: NonNegativeInt | None = None
    ignore_eos: bool | None = None
    stop_token_ids: StopTokenIds | None = None
    skip_special_tokens: bool | None = None
    prompt_logprobs: NumLogprobs | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsOptions | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    cache_salt: CacheSalt | None = None
    # --- end of extensions

    def _max_tokens(self) -> int | None:
        # Unset -> up to the context length (OpenAI's default of 16 truncates silently). 0 (echo, pure scoring)
        # runs one step whose token the response drops: the engine always samples at least one token.
        return 1 if self.max_tokens == 0 else self.max_tokens

    @property
    def scores_only(self) -> bool:
        """`max_tokens: 0` with echo: the response is the prompt and its logprobs, nothing generated."""
        return self.max_tokens == 0

    def _num_logprobs(self) -> int | None:
        return self.logprobs

    def check_supported(self) -> None:
        if self.max_tokens == 0 and not self.echo:
            raise bad_request(
                "max_tokens 0 is only allowed with echo (to score the prompt)", param="max_tokens"
            )
        if self.suffix:
            raise bad_request("suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.num_choices:
            raise bad_request("best_of different from n is not supported", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None
    refusal: list[TokenLogprobOut] | None = None


class AssistantMessage(OmitWhenNone):
    OMIT_WHEN_NONE = ("tool_calls",)

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(OmitWhenNone):
    OMIT_WHEN_NONE = ("prompt_logprobs",)

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # vLLM's extension


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event. Dumped with `exclude_unset=True`: only the fields set explicitly appear."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per generated token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OmitWhenNone):
    OMIT_WHEN_NONE = ("prompt_logprobs",)

    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # vLLM's extension


class CompletionResponse(BaseModel):
    """Both the full response and each streamed chunk (OpenAI uses object "text_completion" for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "plm-serve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
