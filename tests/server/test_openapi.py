"""schemathesis against the server's own OpenAPI document, in process, with a fake engine: every operation,
positive and negative (schema-violating) data, every check on. Zero 5xx, zero conformance failures (status
codes, content types, headers and bodies all as the document declares)."""

from __future__ import annotations

import pytest
import schemathesis
from pydantic import BaseModel
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events

from plm_serve.server.app import create_app
from plm_serve.server.config import ServerConfig
from plm_serve.server.media_fetch import MediaFetcher
from tests.server import hostile
from tests.server.conftest import MODEL_NAME, internal_errors
from tests.server.fake_engine import FakeEngine

# Schema-valid requests may still be refused for what a JSON schema cannot say: a media URL that does not
# fetch, a prompt longer than the context, top_logprobs without logprobs. Those are 400 (or 413), so the
# positive-data check accepts them next to 2xx; every other check keeps its defaults.
CONFIG = SchemathesisConfig.from_str(
    """
[generation]
mode = "all"
max-examples = 25

[checks]
max_response_time = 10.0

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "404", "413"]
"""
)


@pytest.fixture(scope="module")
def schema_app(ckpt_l, processor):
    config = ServerConfig(model=str(ckpt_l), served_model_name=MODEL_NAME)
    app = create_app(config, FakeEngine(), processor=processor)
    app.state.ctx.fetcher = MediaFetcher(
        config, resolver=hostile.hostile_resolver, transport=hostile.hostile_transport()
    )  # no network: every URL the generator invents is answered in process
    return app


@pytest.fixture(scope="module")
def run_summary(schema_app) -> dict:
    """One schemathesis run (every phase: examples, coverage, fuzzing, stateful) over the whole document."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", schema_app, config=CONFIG)
    failures: list[str] = []
    errors: list[str] = []
    cases = 0
    finished = None
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            cases += len(event.recorder.cases)
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        failures.append(
                            f"{event.label}: {check.name}: {failure.title}: {failure.message[:300]}"
                        )
        elif isinstance(event, events.NonFatalError | events.FatalError):
            errors.append(repr(getattr(event, "info", None) or getattr(event, "exception", event))[:500])
        elif isinstance(event, events.EngineFinished):
            finished = event
    return {"failures": failures, "errors": errors, "cases": cases, "finished": finished}


def test_the_server_keeps_its_openapi_document(run_summary):
    assert run_summary["errors"] == []
    assert sorted(set(run_summary["failures"])) == []
    assert run_summary["cases"] > 200  # it did generate and send requests
    assert run_summary["finished"] is not None and run_summary["finished"].stop_reason.value == "completed"


def test_no_generated_request_reached_the_500_path(schema_app):
    assert internal_errors(schema_app) == 0


def test_the_document_declares_what_the_server_answers(schema_app):
    doc = schema_app.openapi()
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat and {"400", "401", "404", "413", "429", "503"} <= set(chat)
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "Retry-After" in chat["429"]["headers"] and "X-Request-Id" in chat["400"]["headers"]
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert set(doc["paths"]["/health"]["get"]["responses"]) == {"200", "503"}
    n = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["n"]["anyOf"][0]
    assert n["maximum"] == 16  # the operator's --max-n, not OpenAI's 128
    assert "HTTPValidationError" not in doc["components"]["schemas"]


class NewBody(BaseModel):
    text: str


def test_routes_added_later_get_the_standard_errors(ckpt_l, processor):
    """A route this module does not know (another branch may add some) keeps its 200 and gets 400 (not 422)."""
    app = create_app(ServerConfig(model=str(ckpt_l)), FakeEngine(), processor=processor)

    @app.post("/v1/new")
    async def new(body: NewBody) -> dict:
        return {}

    responses = app.openapi()["paths"]["/v1/new"]["post"]["responses"]
    assert "422" not in responses and {"200", "400", "413", "429", "503"} <= set(responses)
    assert all("X-Request-Id" in r["headers"] for r in responses.values())
    assert "Retry-After" in responses["429"]["headers"]
