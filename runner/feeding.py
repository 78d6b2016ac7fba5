"""Handing requests to an engine wherever it runs (this process, the engine process, a Ray
replica): a request the engine refuses becomes a failed output, never an exception."""

from __future__ import annotations

from runner.types import Engine, EngineOutput, EngineRequest, RequestRejected

COUNTERS_SECONDS = 0.5  # how often an engine that finishes nothing still reports progress


def rejected(request: EngineRequest, error: RequestRejected) -> EngineOutput:
    return EngineOutput(request.key, 0, error_code=error.code, error_message=error.message)


def add_all(engine: Engine, requests: list[EngineRequest], ready: list[EngineOutput]) -> None:
    """Add each request; the refused ones go to `ready` as failed outputs."""
    for request in requests:
        try:
            engine.add(request)
        except RequestRejected as error:
            ready.append(rejected(request, error))
