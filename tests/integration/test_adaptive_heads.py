"""Introspection heads end to end on the real model: traces -> `ponder heads train` -> serve -> `adaptive`.

Runs its own two servers (the base model, then the checkpoint with heads) one after the other, after the
suite's shared server has stopped (`own_servers`), so only one engine runs at a time. The heads are trained
on a dozen requests for a few epochs: this proves the plumbing; docs/benchmarks.md measures the gain.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from server.introspection import IntrospectionHeads
from server.trace_journal import read_records
from training.evaluate import EvalConfig, run_eval
from training.heads import PLOT_FILE, REPORT_FILE, HeadsConfig, train
from training.server_process import ServerProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.own_servers,
    pytest.mark.usefixtures("no_shared_server"),
]

SERVE_ARGS = ("--max-model-len", "1024")
GREEDY_PROMPTS = ["What is 7 * 8?", "Name a colour.", "What is 12 + 30? Answer briefly."]
MAX_TOKENS = 48


def greedy_replies(client: openai.OpenAI, model: str) -> list[str]:
    return [
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": p}], max_tokens=24, temperature=0
        )
        .choices[0]
        .message.content
        for p in GREEDY_PROMPTS
    ]


def test_heads_trained_from_traces_serve_the_adaptive_strategy(tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    with ServerProcess(None, traces, tmp_path / "base.log", SERVE_ARGS) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        (base_model,) = [m.id for m in client.models.list()]
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=base_model,
                messages=[{"role": "user", "content": "What is 2 * 3?"}],
                max_tokens=8,
                extra_headers={"X-Strategy": "adaptive"},
            )
        assert "needs introspection heads" in refused.value.message
        base_greedy = greedy_replies(client, base_model)
        config = EvalConfig(
            base_url=server.base_url,
            count=12,
            seed=11,
            strategies=["self_consistency:n=4"],
            max_tokens=MAX_TOKENS,
            concurrency=4,
            output_dir=str(tmp_path / "bootstrap"),
        )
        results = asyncio.run(run_eval(config))
    assert all(r.error is None for r in results), [r.error for r in results if r.error]

    checkpoint = tmp_path / "model"
    report = train(
        HeadsConfig(
            traces=str(traces), output_dir=str(checkpoint), max_tokens=MAX_TOKENS, held_out=0.25, epochs=5, seed=0
        )
    )
    heads = IntrospectionHeads.load(checkpoint)
    assert heads is not None and heads.size == 64
    assert report["train"]["sequences"] > 0 and report["train"]["last_loss"] < report["train"]["prior_loss"]
    assert set(report["held_out"]["auroc"]) == {"start", "middle", "end"}
    assert (checkpoint / REPORT_FILE).exists() and (checkpoint / PLOT_FILE).stat().st_size > 1000

    with ServerProcess(str(checkpoint), tmp_path / "heads-traces", tmp_path / "heads.log", SERVE_ARGS) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        http = httpx.Client(base_url=server.base_url, timeout=60)
        (model,) = [m.id for m in client.models.list()]
        listed = http.get("/strategies").json()
        assert "adaptive" in {s["name"] for s in listed["data"]}
        assert next(v for v in listed["verifiers"] if v["name"] == "introspection")["available"]

        # the masked rows leave generation exactly as it was
        assert greedy_replies(client, model) == base_greedy

        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "What is 6 * 7?"}],
            max_tokens=MAX_TOKENS,
            extra_body={"strategy": {"name": "adaptive", "k0": 2, "chunk_tokens": 8, "max_samples": 4}},
        )
        reply = raw.parse()
        assert reply.choices[0].message.content.strip()
        assert raw.headers["X-Strategy"] == "adaptive"
        trace = http.get(f"/traces/{raw.headers['X-Trace-Id']}").json()
        assert trace["details"]["decisions"] and trace["details"]["stopped"]
        assert all("action" in d and d["utilities"] for d in trace["details"]["decisions"])
        assert all(0.0 <= c["scores"]["introspection"] <= 1.0 for c in trace["candidates"])
        assert reply.usage.completion_tokens == sum(call["generated_tokens"] for call in trace["engine_calls"])

        scored = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "What is 5 * 9?"}],
            max_tokens=MAX_TOKENS,
            extra_headers={"X-Strategy": "best_of_n", "X-Strategy-Options": '{"n": 3, "verifier": "introspection"}'},
        )
        scored_trace = http.get(f"/traces/{scored.headers['X-Trace-Id']}").json()
        assert [c["kind"] for c in scored_trace["engine_calls"]] == ["sample"]  # scored at no extra engine pass

        effort = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "What is 4 * 4?"}], max_tokens=32, reasoning_effort="low"
        )
        assert effort.headers["X-Strategy"] == "adaptive"  # effort maps to adaptive's budget on a model with heads

    served = [r for r in read_records(tmp_path / "heads-traces") if r["type"] == "request"]
    head_ids = set(heads.token_ids)
    assert served and all(not head_ids & set(c["token_ids"]) for r in served for c in r["candidates"])
    assert all("<|ponder_" not in c["text"] for r in served for c in r["candidates"])
