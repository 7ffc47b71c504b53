"""The HTTP routes. Handlers stay thin: check the model id, then hand over to chat.py / completions.py /
responses.py / tokenize.py."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from plm_serve.server import chat, completions, responses, tokenize
from plm_serve.server.deps import CtxDep, EngineDep, ProcessorDep, check_model
from plm_serve.server.errors import APIError
from plm_serve.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from plm_serve.server.responses_protocol import ResponsesRequest
from plm_serve.server.strict_json import StrictJSONRoute
from plm_serve.server.tokenize import DetokenizeRequest, TokenizeRequest
from plm_serve.server.version import VERSION

router = APIRouter(route_class=StrictJSONRoute)  # JSON bodies are read strictly (strict_json.py)


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, ctx: CtxDep, engine: EngineDep, _: ProcessorDep
) -> Response:
    check_model(body.model, ctx)
    return await chat.create_chat_completion(body, request, ctx, engine)


@router.post("/v1/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, request: Request, ctx: CtxDep, engine: EngineDep, _: ProcessorDep
) -> Response:
    check_model(body.model, ctx)
    return await completions.create_completion(body, request, ctx, engine)


@router.post("/v1/responses", response_model=None)
async def create_response(
    body: ResponsesRequest, request: Request, ctx: CtxDep, engine: EngineDep, _: ProcessorDep
) -> Response:
    check_model(body.model, ctx)
    return await responses.create_response(body, request, ctx, engine)


@router.post("/tokenize")
async def tokenize_prompt(
    body: TokenizeRequest, ctx: CtxDep, engine: EngineDep, _: ProcessorDep
) -> JSONResponse:
    check_model(body.model, ctx)
    return await tokenize.tokenize(body, ctx, engine)


@router.post("/detokenize")
async def detokenize_tokens(body: DetokenizeRequest, ctx: CtxDep, _: ProcessorDep) -> JSONResponse:
    check_model(body.model, ctx)
    return tokenize.detokenize(body, ctx)


def _model_card(ctx: CtxDep) -> ModelCard:
    return ModelCard(
        id=ctx.model_name,
        created=ctx.created,
        root=ctx.config.model,
        max_model_len=ctx.engine.max_model_len if ctx.engine is not None else None,
    )


@router.get("/v1/models")
async def list_models(ctx: CtxDep) -> JSONResponse:
    return JSONResponse(ModelList(data=[_model_card(ctx)]).model_dump(mode="json"))


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, ctx: CtxDep) -> JSONResponse:
    if model_id != ctx.model_name:
        raise APIError(
            404,
            f"The model `{model_id}` does not exist. This server serves `{ctx.model_name}`.",
            param="model",
            code="model_not_found",
        )
    return JSONResponse(_model_card(ctx).model_dump(mode="json"))


@router.get("/health")
async def health(ctx: CtxDep) -> JSONResponse:
    """200 when requests can be served; 503 while loading, after a failed load, when the engine died, or
    draining."""
    reason = ctx.unavailable_reason()
    if reason is None:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)


@router.get("/metrics")
async def metrics(ctx: CtxDep) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": VERSION})
