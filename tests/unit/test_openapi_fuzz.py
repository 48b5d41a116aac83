"""Schemathesis against the app's own OpenAPI schema, in-process with the scripted engine: whatever a client
sends, valid or not, the answer is never a 5xx (and every error is in OpenAI's envelope)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from server.app import create_app
from server.settings import ServerSettings
from tests.fakes import CharRenderer, ScriptedEngine

KEY = "fuzz-key-0123456789"


def build_app(trace_dir: Path):
    config = ServerSettings(
        model_path="unused",
        served_model_name="toy",
        trace_dir=trace_dir,
        trace_flush_interval_s=0.01,
        api_keys=(KEY,),
        max_tokens_cap=64,
        max_samples_per_request=4,
    )
    return create_app(config, lambda: ScriptedEngine(["The answer is 42."]), CharRenderer)


# The schema is read at collection time; the trace directory is created when the lifespan starts.
APP = build_app(Path(tempfile.mkdtemp(prefix="ponder-fuzz-")) / "traces")
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def running_app() -> Iterator[None]:
    with TestClient(APP):  # runs the lifespan: engine, journal, service on app.state
        yield
    shutil.rmtree(APP.state.service.settings.trace_dir.parent, ignore_errors=True)


def asked_for_deadline(case) -> bool:
    return isinstance(case.body, dict) and case.body.get("deadline_s") is not None


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_a_server_error(case):
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "toy"  # the served model: otherwise nearly every case stops at a 404
    response = case.call(headers={"Authorization": f"Bearer {KEY}"})
    if asked_for_deadline(case) and response.status_code == 504:
        # the client's own (generated, often tiny) deadline passed: the 504 is what it asked for, not a failure
        assert response.json()["error"]["code"] == "deadline_exceeded", response.text
        return
    case.validate_response(response, checks=(not_a_server_error,))
    if response.status_code >= 400:
        assert list(response.json()["error"]) == ["message", "type", "param", "code"], response.text
