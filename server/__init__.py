"""The OpenAI-compatible HTTP frontend: `create_app` (server/app.py) and the `plm-serve` CLI (server/__main__.py).

Request flow: routes.py -> chat.py / completions.py (fetch media, run the processor off the event loop, build an
EngineRequest) -> runner.py (submit, stream StepOutputs, abort on disconnect) -> SSE chunks or one JSON body.
"""
