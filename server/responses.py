"""POST /v1/responses: OpenAI's Responses API, stateless (nothing is stored; `previous_response_id` is refused).

The request becomes chat messages (`instructions` first, as a system message; `function_call` items as assistant
tool calls, `function_call_output` items as tool results), then goes through the chat machinery: media loading,
the processor with the tools shown (tool_prompt.py), tool planning and grammars (tools.py), the output
constraint of `text.format` (structured.py), the same ToolCallParser. The output is `message` and
`function_call` items; a stream sends OpenAI's events in order:

    response.created, response.in_progress,
    per message:  response.output_item.added, response.content_part.added, response.output_text.delta...,
                  response.output_text.done, response.content_part.done, response.output_item.done
    per call:     response.output_item.added, response.function_call_arguments.delta...,
                  response.function_call_arguments.done, response.output_item.done
    response.completed (or response.incomplete when max_output_tokens ran out)

each as `event: <type>` + `data: <json with type and sequence_number>`; an error after the start is an `error`
event. There is no `[DONE]` line (the Responses API has none).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from plm_serve.engine import EngineClient, EngineRequest, SamplingParams, StepOutput
from plm_serve.server.deps import ServerContext
from plm_serve.server.errors import bad_request, from_exception
from plm_serve.server.limits import check_caps, request_cache_salt
from plm_serve.server.metrics import RequestRecorder
from plm_serve.server.protocol import ChatMessage, ImageURL, ImageURLPart, TextPart
from plm_serve.server.protocol_tools import FunctionCallIn, JsonSchemaFormat, ResponseFormat, ToolCallIn
from plm_serve.server.request_common import chat_engine_request, constrain
from plm_serve.server.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputImage,
    InputMessage,
    InputTokensDetails,
    ItemStatus,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from plm_serve.server.runner import UsageCounter, cancel_on_disconnect, failure_of, open_generation
from plm_serve.server.sse import SSEResponse
from plm_serve.server.structured import from_response_format
from plm_serve.server.tool_parser import ParsedCall, ToolEvent
from plm_serve.server.tools import NO_PARAMETERS, Function, ToolPlan, plan_tools


async def create_response(
    body: ResponsesRequest, http: Request, ctx: ServerContext, engine: EngineClient
) -> Response:
    if body.previous_response_id is not None:
        raise bad_request(
            "this server is stateless: previous_response_id is not supported; send the history as input items",
            param="previous_response_id",
        )
    plan = _tool_plan(body)
    arrival = time.monotonic()
    template = _response_template(body, f"resp_{uuid.uuid4().hex}", ctx.model_name)
    recorder = RequestRecorder(ctx.metrics, arrival)
    usage = UsageCounter(report_cached=ctx.config.report_cached_tokens)
    salt = request_cache_salt(None, http.headers.get("authorization"), ctx.config)

    async def start() -> AsyncGenerator[StepOutput, None]:
        request = await build_request(body, plan, ctx, engine, template.id, arrival, cache_salt=salt)
        usage.prompt_tokens = len(request.prompt_token_ids)
        return await open_generation(engine, request, recorder)

    if body.stream:
        outputs = await cancel_on_disconnect(http, start())
        return SSEResponse(stream_events(outputs, template, usage, plan))

    async def run() -> ResponseObject:
        return await collect(await start(), template, usage, plan)

    response = await cancel_on_disconnect(http, run())
    return JSONResponse(response.model_dump(mode="json"))


# ----------------------------------------------------------------------------------------- request building
def _tool_plan(body: ResponsesRequest) -> ToolPlan:
    functions = [
        Function(t.name, t.description, t.parameters or dict(NO_PARAMETERS)) for t in body.tools or []
    ]
    choice = body.tool_choice
    if choice is not None and not isinstance(choice, str):
        return plan_tools(functions, "named", choice.name, body.parallel_tool_calls, "tool_choice")
    return plan_tools(functions, choice, None, body.parallel_tool_calls, "tool_choice")


async def build_request(
    body: ResponsesRequest,
    plan: ToolPlan,
    ctx: ServerContext,
    engine: EngineClient,
    request_id: str,
    arrival: float,
    cache_salt: str | None = None,
) -> EngineRequest:
    assert ctx.processor is not None
    answer = None
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type != "text":
        schema = JsonSchemaFormat(name=fmt.name or "response", schema=fmt.json_schema, strict=fmt.strict)
        answer = from_response_format(ResponseFormat(type=fmt.type, json_schema=schema), "text.format")
    param = "text.format" if answer is not None else "tool_choice"
    greedy = body.top_p == 0.0  # the nucleus shrinks to the best token, as in chat
    try:
        params = SamplingParams(
            max_tokens=body.max_output_tokens,
            temperature=0.0 if greedy else body.temperature or 0.0,
            top_p=1.0 if greedy or body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),
            seed=body.seed,
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
        )
    except ValueError as exc:  # the messages start with the field's name
        raise bad_request(str(exc), param=str(exc).split(" ", 1)[0]) from None
    check_caps(params, ctx.config)
    params = await constrain(params, engine, plan.grammar(answer, param), param)
    return await chat_engine_request(
        chat_messages(body), params, plan.prompt_tools, ctx, engine, request_id, arrival, cache_salt
    )


def chat_messages(body: ResponsesRequest) -> list[ChatMessage]:
    """The Responses input as chat messages (positions shift by one when `instructions` are given)."""
    messages = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    items = [InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    for i, item in enumerate(items):
        if isinstance(item, FunctionCallItem):
            call = ToolCallIn(
                id=item.call_id, function=FunctionCallIn(name=item.name, arguments=item.arguments)
            )
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls and not last.content:
                last.tool_calls.append(call)  # consecutive calls are one assistant turn
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(ChatMessage(role="tool", content=item.output, tool_call_id=item.call_id))
        else:
            messages.append(_message(item, f"input[{i}]"))
    return messages


def _message(item: InputMessage, where: str) -> ChatMessage:
    if isinstance(item.content, str):
        return ChatMessage(role=item.role, content=item.content)
    parts: list[Any] = []
    for j, part in enumerate(item.content):
        if isinstance(part, InputImage):
            if part.image_url is None:
                raise bad_request(
                    "input_image needs image_url (this server keeps no files)", param=f"{where}.content[{j}]"
                )
            parts.append(
                ImageURLPart(type="image_url", image_url=ImageURL(url=part.image_url, detail=part.detail))
            )
        else:
            parts.append(TextPart(type="text", text=part.text))
    return ChatMessage(role=item.role, content=parts)


def _response_template(body: ResponsesRequest, response_id: str, model: str) -> ResponseObject:
    """The response as the request configured it, without output: what response.created carries."""
    text = (
        {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)}
        if body.text and body.text.format
        else None
    )
    choice = (
        body.tool_choice.model_dump()
        if body.tool_choice is not None and not isinstance(body.tool_choice, str)
        else body.tool_choice
    )
    response = ResponseObject(
        id=response_id,
        created_at=int(time.time()),
        status="in_progress",
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        model=model,
        parallel_tool_calls=body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
        temperature=body.temperature,
        top_p=body.top_p,
        tool_choice=choice or ("auto" if body.tools else "none"),
        tools=[t.model_dump(exclude_none=True) for t in body.tools or []],
        metadata=body.metadata or {},
    )
    if text:
        response.text = text
    return response


# ------------------------------------------------------------------------------------------------ responses
def _usage(usage: UsageCounter) -> ResponseUsage:
    u = usage.usage()
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
    return ResponseUsage(
        input_tokens=u.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
    )


def _finished(
    template: ResponseObject, output: list[OutputItem], reason: str | None, usage: UsageCounter
) -> ResponseObject:
    incomplete = reason == "length"
    return template.model_copy(
        update={
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            "output": output,
            "usage": _usage(usage),
        }
    )


def _call_item(call: ParsedCall, status: ItemStatus) -> OutputFunctionCall:
    return OutputFunctionCall(
        id=f"fc_{call.id.removeprefix('call_')}",
        call_id=call.id,
        name=call.name,
        arguments=call.arguments,
        status=status,
    )


async def collect(
    outputs: AsyncGenerator[StepOutput, None], template: ResponseObject, usage: UsageCounter, plan: ToolPlan
) -> ResponseObject:
    texts: list[str] = []
    reason = None
    async with aclosing(outputs):
        async for out in outputs:
            usage.observe(out)
            failure = failure_of(out)
            if failure is not None:
                raise failure
            texts.append(out.text)
            if out.finish_reason is not None:
                reason = out.finish_reason.value
    text, calls = "".join(texts), []
    parser = plan.parser()
    if parser is not None:
        parser.feed(text)
        parser.finish()
        text, calls = parser.content, parser.calls
    status: ItemStatus = "incomplete" if reason == "length" else "completed"
    output: list[OutputItem] = []
    if text or not calls:
        output.append(
            OutputMessage(id=f"msg_{uuid.uuid4().hex}", status=status, content=[OutputText(text=text)])
        )
    output += [_call_item(c, status) for c in calls]
    return _finished(template, output, reason, usage)


@dataclass
class _EventWriter:
    """Turns content and tool-call events into the Responses stream's events, opening and closing items."""

    template: ResponseObject
    sequence: int = 0
    output: list[OutputItem] = field(default_factory=list)
    message: OutputMessage | None = None  # the open message item, if any
    call: OutputFunctionCall | None = None  # the open function call item, if any

    def event(self, kind: str, **payload: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **payload}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def lifecycle(self, kind: str, response: ResponseObject) -> str:
        return self.event(kind, response=response.model_dump(mode="json"))

    def add(self, event: ToolEvent) -> list[str]:
        if event.content is not None:
            return self._text(event.content)
        if event.call is not None:
            events = self.close("completed")
            self.call = _call_item(event.call, "in_progress").model_copy(update={"arguments": ""})
            self.output.append(self.call)
            events.append(
                self.event(
                    "response.output_item.added", output_index=self._index(), item=self.call.model_dump()
                )
            )
            return events
        assert self.call is not None and event.arguments is not None
        self.call.arguments += event.arguments
        return [
            self.event(
                "response.function_call_arguments.delta",
                item_id=self.call.id,
                output_index=self._index(),
                delta=event.arguments,
            )
        ]

    def _text(self, text: str) -> list[str]:
        events = []
        if self.message is None:
            events += self.close("completed")
            self.message = OutputMessage(id=f"msg_{uuid.uuid4().hex}", status="in_progress", content=[])
            self.output.append(self.message)
            events.append(
                self.event(
                    "response.output_item.added", output_index=self._index(), item=self.message.model_dump()
                )
            )
            self.message.content.append(OutputText(text=""))
            part = self.message.content[0].model_dump()
            events.append(
                self.event(
                    "response.content_part.added",
                    item_id=self.message.id,
                    output_index=self._index(),
                    content_index=0,
                    part=part,
                )
            )
        if text:
            self.message.content[0].text += text
            events.append(
                self.event(
                    "response.output_text.delta",
                    item_id=self.message.id,
                    output_index=self._index(),
                    content_index=0,
                    delta=text,
                    logprobs=[],
                )
            )
        return events

    def close(self, status: ItemStatus) -> list[str]:
        """Close the open item (a message's text and part first)."""
        events = []
        index = self._index()
        if self.message is not None:
            item, self.message = self.message, None
            part = item.content[0]
            events.append(
                self.event(
                    "response.output_text.done",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    text=part.text,
                    logprobs=[],
                )
            )
            events.append(
                self.event(
                    "response.content_part.done",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    part=part.model_dump(),
                )
            )
            item.status = status
            events.append(self.event("response.output_item.done", output_index=index, item=item.model_dump()))
        elif self.call is not None:
            call, self.call = self.call, None
            events.append(
                self.event(
                    "response.function_call_arguments.done",
                    item_id=call.id,
                    output_index=index,
                    name=call.name,
                    arguments=call.arguments,
                )
            )
            call.status = status
            events.append(self.event("response.output_item.done", output_index=index, item=call.model_dump()))
        return events

    def _index(self) -> int:
        return len(self.output) - 1


async def stream_events(
    outputs: AsyncGenerator[StepOutput, None], template: ResponseObject, usage: UsageCounter, plan: ToolPlan
) -> AsyncIterator[str]:
    writer = _EventWriter(template)
    parser = plan.parser()
    yield writer.lifecycle("response.created", template)
    yield writer.lifecycle("response.in_progress", template)
    try:
        async with aclosing(outputs):
            async for out in outputs:
                usage.observe(out)
                failure = failure_of(out)
                if failure is not None:
                    raise failure
                events = [ToolEvent(content=out.text)] if parser is None else parser.feed(out.text)
                if out.finish_reason is not None and parser is not None:
                    events += parser.finish()
                for event in events:
                    for line in writer.add(event):
                        yield line
                if out.finish_reason is not None:
                    if not writer.output:
                        for line in writer.add(ToolEvent(content="")):
                            yield line
                    status: ItemStatus = "incomplete" if out.finish_reason.value == "length" else "completed"
                    for line in writer.close(status):
                        yield line
                    final = _finished(template, writer.output, out.finish_reason.value, usage)
                    kind = "response.incomplete" if final.status == "incomplete" else "response.completed"
                    yield writer.lifecycle(kind, final)
    except Exception as exc:  # after the status line: report in-band, as OpenAI's `error` event
        error = from_exception(exc)
        yield writer.event("error", code=error.code, message=error.message, param=error.param)
