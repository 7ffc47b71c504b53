"""OpenAI wire models for tools and structured outputs (chat and completions; the Responses API has its own
spellings in responses_protocol.py), plus vLLM's guided-decoding extensions."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from plm_serve.server.protocol_base import OpenAIBaseModel

FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.\-]+$")]


# ------------------------------------------------------------------------------------------------ requests
class FunctionDefinition(OpenAIBaseModel):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; None: the function takes no arguments
    strict: bool | None = None


class ChatTool(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallIn(OpenAIBaseModel):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI returns it


class ToolCallIn(OpenAIBaseModel):
    """An assistant message's earlier tool call, sent back in the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class JsonSchemaFormat(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsOptions(OpenAIBaseModel):
    """vLLM's `structured_outputs` object: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    model_config = ConfigDict(extra="allow", populate_by_name=True)


# ------------------------------------------------------------------------------------------------ responses
class OmitWhenNone(BaseModel):
    """Response models whose newer optional fields (`OMIT_WHEN_NONE`) are left out when unset, so responses that
    do not use a feature keep exactly the shape they had without it."""

    OMIT_WHEN_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        for name in self.OMIT_WHEN_NONE:
            if isinstance(data, dict) and data.get(name, 0) is None:
                del data[name]
        return data


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed piece of a tool call: the first carries id, type and name; later ones argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry, keyed by token id."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None
