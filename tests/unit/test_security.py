"""API keys, request limits and secret/content redaction on every sink (journal, /v1/traces, logs)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.redaction import MASK, Redactor, hash_text, install_log_masking, mask_secrets
from server.security import collect_api_keys, digest, key_matches, read_keys_file
from server.settings import ServerSettings
from server.trace_journal import read_records
from tests.fakes import CharRenderer, ScriptedEngine

MODEL = "toy"
KEY, OTHER_KEY = "sk-ponder-test-key-000000001", "second-key-abcdef"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is 6 * 7?"}], "max_tokens": 16}
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextmanager
def serve(tmp_path: Path, engine: ScriptedEngine | None = None, **settings: Any) -> Iterator[TestClient]:
    engine = engine or ScriptedEngine(["The answer is 42."])
    settings.setdefault("trace_flush_interval_s", 0.01)
    config = ServerSettings(model_path="unused", served_model_name=MODEL, trace_dir=tmp_path / "traces", **settings)
    with TestClient(create_app(config, lambda: engine, CharRenderer)) as client:
        yield client


def assert_error(response, status: int, code: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and list(body["error"]) == ["message", "type", "param", "code"]
    assert body["error"]["code"] == code
    return body["error"]


# ---------------------------------------------------------------------------------------------- API keys
def test_key_matching_is_exact():
    digests = [digest(KEY), digest(OTHER_KEY)]
    assert key_matches(KEY, digests) and key_matches(OTHER_KEY, digests)
    assert not key_matches(KEY[:-1], digests) and not key_matches(KEY + "x", digests) and not key_matches("", digests)


def test_keys_come_from_flags_env_and_file(tmp_path: Path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nfile-key-1\n\n  file-key-2  \n")
    assert read_keys_file(keys_file) == ["file-key-1", "file-key-2"]
    keys = collect_api_keys(["flag-key", "flag-key"], keys_file, environ={"PONDER_API_KEY": "env-key"})
    assert keys == ("flag-key", "env-key", "file-key-1", "file-key-2")
    assert collect_api_keys(None, None, environ={}) == ()


PROTECTED = [
    ("post", "/v1/chat/completions", CHAT),
    ("post", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4}),
    ("get", "/v1/models", None),
    ("get", f"/v1/models/{MODEL}", None),
    ("get", "/v1/strategies", None),
    ("get", "/v1/traces/tr-000000000000000000000000", None),
    ("post", "/v1/traces/tr-000000000000000000000000/feedback", {"reward": 1}),
]


@pytest.fixture(scope="module")
def keyed_client(tmp_path_factory) -> Iterator[TestClient]:
    with serve(tmp_path_factory.mktemp("keyed"), api_keys=(KEY, OTHER_KEY)) as client:
        yield client


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}],
    ids=["none", "wrong", "no-scheme", "basic"],
)
def test_every_api_route_needs_a_key(keyed_client, method, path, body, headers):
    response = keyed_client.request(method, path, json=body, headers=headers)
    error = assert_error(response, 401, "invalid_api_key")
    assert error["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"
    assert KEY not in response.text


@pytest.mark.parametrize("key", [KEY, OTHER_KEY])
def test_any_configured_key_is_accepted(keyed_client, key):
    assert keyed_client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}).is_success
    assert keyed_client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).is_success


def test_health_and_metrics_need_no_key_by_default(keyed_client):
    assert keyed_client.get("/health").status_code == 200
    assert keyed_client.get("/metrics").status_code == 200


def test_metrics_can_require_a_key(tmp_path):
    with serve(tmp_path, api_keys=(KEY,), metrics_require_auth=True) as client:
        assert_error(client.get("/metrics"), 401, "invalid_api_key")
        assert client.get("/metrics", headers=AUTH).status_code == 200
        assert client.get("/health").status_code == 200


def test_no_keys_means_open(tmp_path):
    with serve(tmp_path) as client:
        assert client.post("/v1/chat/completions", json=CHAT).is_success


def test_the_openapi_schema_declares_bearer_auth(keyed_client):
    schema = keyed_client.get("/openapi.json", headers=AUTH).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" not in schema["paths"]["/health"]["get"]


# ---------------------------------------------------------------------------------------------- limits
def test_a_body_over_the_limit_is_a_413_before_parsing(tmp_path):
    with serve(tmp_path, max_body_bytes=1000) as client:
        big = CHAT | {"messages": [{"role": "user", "content": "x" * 2000}]}
        assert_error(client.post("/v1/chat/completions", json=big), 413, "request_too_large")

        def chunked():  # no Content-Length: the limit is enforced while reading
            payload = json.dumps(big).encode()
            for i in range(0, len(payload), 100):
                yield payload[i : i + 100]

        response = client.post("/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"})
        assert_error(response, 413, "request_too_large")
        assert client.post("/v1/chat/completions", json=CHAT).is_success  # and small ones still pass


def test_a_chunked_body_under_the_limit_is_replayed_intact(tmp_path):
    with serve(tmp_path, max_body_bytes=10_000) as client:
        payload = json.dumps(CHAT).encode()
        response = client.post(
            "/v1/chat/completions",
            content=(payload[i : i + 7] for i in range(0, len(payload), 7)),
            headers={"Content-Type": "application/json"},
        )
        assert response.is_success, response.text


def test_message_and_test_counts_are_capped(tmp_path):
    with serve(tmp_path, max_messages=3, max_tests=2) as client:
        many = CHAT | {"messages": [{"role": "user", "content": "hi"}] * 4}
        error = assert_error(client.post("/v1/chat/completions", json=many), 400, "too_many_messages")
        assert error["param"] == "messages" and "limit of 3" in error["message"]
        tests = CHAT | {"tests": ["assert True"] * 3}
        assert assert_error(client.post("/v1/chat/completions", json=tests), 400, None)["param"] == "tests"
        assert client.post("/v1/chat/completions", json=CHAT | {"messages": many["messages"][:3]}).is_success


def test_n_and_max_tokens_and_strategy_caps_are_400s(tmp_path):
    with serve(tmp_path, max_samples_per_request=4, max_tokens_cap=64) as client:
        assert assert_error(client.post("/v1/chat/completions", json=CHAT | {"n": 5}), 400, None)["param"] == "n"
        too_long = CHAT | {"max_tokens": 65}
        assert assert_error(client.post("/v1/chat/completions", json=too_long), 400, None)["param"] == "max_tokens"
        search = CHAT | {"strategy": {"name": "best_of_n", "n": 8}}
        assert client.post("/v1/chat/completions", json=search).status_code == 400


# ---------------------------------------------------------------------------------------------- redaction
SECRET_TEXTS = [
    ("my key is sk-abcdefghijklmnop0123", "sk-abcdefghijklmnop0123"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload", "eyJhbGciOiJIUzI1NiJ9.payload"),
    ("api_key=hunter2hunter2", "hunter2hunter2"),
    ('{"password": "correct-horse-battery"}', "correct-horse-battery"),
    ("aws AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE"),
]


@pytest.mark.parametrize(("text", "secret"), SECRET_TEXTS)
def test_secrets_are_masked(text, secret):
    masked = mask_secrets(text)
    assert secret not in masked and MASK in masked


def test_known_keys_are_masked_and_plain_text_is_not():
    assert mask_secrets("the key is short1234", ["short1234"]) == f"the key is {MASK}"
    for plain in ["What is 6 * 7?", "max_tokens: 512", "The answer is 42.", "tokens = 12"]:
        assert mask_secrets(plain) == plain


def test_redactor_modes_on_a_record():
    record = {
        "type": "request",
        "input": {"messages": [{"role": "user", "content": "secret plan sk-abcdefghijklmnop0123"}]},
        "reference": "42",
        "tests": ["assert f() == 1"],
        "candidates": [{"index": 0, "text": "It is 42", "answer": "42", "num_tokens": 3, "token_ids": [7, 8, 9]}],
        "details": {"votes": {"42": 3}, "mode": "beam", "nodes": [{"id": 0, "text": "step", "value": 0.5}]},
        "error": None,
        "strategy": {"name": "single"},
    }
    kept = Redactor("keep").trace_record(record)
    assert "sk-abcdefghijklmnop0123" not in json.dumps(kept) and kept["candidates"][0]["text"] == "It is 42"
    hashed = Redactor("hash").trace_record(record)
    assert hashed["input"]["messages"][0]["content"] == hash_text("secret plan sk-abcdefghijklmnop0123")
    assert hashed["input"]["messages"][0]["role"] == "user"
    assert hashed["candidates"][0]["text"] == hash_text("It is 42") and hashed["candidates"][0]["num_tokens"] == 3
    assert hashed["candidates"][0]["token_ids"] is None and kept["candidates"][0]["token_ids"] == [7, 8, 9]
    assert hashed["details"]["votes"] == {hash_text("42"): 3} and hashed["details"]["mode"] == "beam"
    assert hashed["details"]["nodes"][0] == {"id": 0, "text": hash_text("step"), "value": 0.5}
    dropped = Redactor("drop").trace_record(record)
    assert dropped["input"]["messages"][0]["content"] is None and dropped["reference"] is None
    assert dropped["candidates"][0]["text"] is None and dropped["tests"] == [None]
    assert dropped["strategy"] == {"name": "single"}
    assert record["candidates"][0]["text"] == "It is 42"  # the input is not mutated


def journal_text(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in (tmp_path / "traces").glob("*.jsonl"))


SECRET = "sk-live-0123456789abcdefghij"
SECRET_CHAT = CHAT | {
    "messages": [{"role": "user", "content": f"Use {SECRET} to log in. What is 6 * 7?"}],
    "max_tokens": 64,
}


@pytest.mark.parametrize("mode", ["keep", "hash", "drop"])
def test_every_trace_sink_is_redacted(tmp_path, mode):
    engine = ScriptedEngine([f"Sure, logging in with {SECRET}: 42"])
    with serve(tmp_path, engine, trace_content=mode, api_keys=(KEY,)) as client:
        response = client.post("/v1/chat/completions", json=SECRET_CHAT, headers=AUTH)
        assert response.is_success
        assert SECRET in response.json()["choices"][0]["message"]["content"]  # the client gets its answer
        trace_id = response.headers["x-trace-id"]
        feedback = {"reward": 1, "comment": f"worked with {SECRET}", "reference": "42"}
        assert client.post(f"/v1/traces/{trace_id}/feedback", json=feedback, headers=AUTH).is_success
        served = client.get(f"/v1/traces/{trace_id}", headers=AUTH).json()
    on_disk = journal_text(tmp_path)
    for sink in (on_disk, json.dumps(served)):
        assert SECRET not in sink
        assert (MASK in sink) == (mode == "keep")
        assert ("What is 6 * 7?" in sink) == (mode == "keep")
    records = list(read_records(tmp_path / "traces"))
    request = next(r for r in records if r["type"] == "request")
    content = request["input"]["messages"][0]["content"]
    if mode == "hash":
        assert content.startswith("sha256:") and request["candidates"][0]["text"].startswith("sha256:")
    if mode == "drop":
        assert content is None and request["candidates"][0]["text"] is None


def test_logs_are_masked(caplog):
    undo = install_log_masking(Redactor(known_secrets=["plain-key-1234"]))
    try:
        with caplog.at_level(logging.INFO):
            logging.getLogger("anything").info("client sent %s and %s", f"Bearer {SECRET}", "plain-key-1234")
            try:
                raise ValueError(f"bad {SECRET}")
            except ValueError:
                logging.getLogger("vllm.something").exception("failed")
    finally:
        undo()
    assert SECRET not in caplog.text and "plain-key-1234" not in caplog.text
    assert caplog.text.count(MASK) >= 3


def test_a_failed_request_logs_no_secret(tmp_path, caplog):
    def explode(*args):
        raise RuntimeError(f"engine choked on {SECRET}")

    undo = install_log_masking(Redactor())
    try:
        with caplog.at_level(logging.INFO), serve(tmp_path, ScriptedEngine(script=explode)) as client:
            response = client.post("/v1/chat/completions", json=SECRET_CHAT)
    finally:
        undo()
    assert response.status_code == 500
    assert "engine choked" in caplog.text and SECRET not in caplog.text
    assert SECRET not in journal_text(tmp_path)
