"""The load generator's pure parts: strategy specs, request bodies, percentiles and the summary."""

from __future__ import annotations

import pytest

from loadtests.loadgen import RequestResult, Scenario, Slo, StrategySpec, percentile, request_body, summarize


def test_strategy_specs_parse():
    assert StrategySpec.parse("single") == StrategySpec("single", {})
    spec = StrategySpec.parse("best_of_n:n=8,verifier=logprob")
    assert spec.options == {"n": 8, "verifier": "logprob"} and spec.label == "best_of_n n=8 verifier=logprob"


def test_raw_vllm_gets_no_strategy_and_no_seed():
    scenario = Scenario(StrategySpec("single"), concurrency=1)
    assert request_body(scenario, "hi", raw_vllm=True)["extra_body"] is None
    body = request_body(Scenario(StrategySpec.parse("best_of_n:n=4"), concurrency=1), "hi", raw_vllm=False)
    assert body["extra_body"] == {"strategy": {"name": "best_of_n", "n": 4}} and "seed" not in body
    assert body["stream"] and body["stream_options"] == {"include_usage": True}


def test_percentile_interpolates_like_numpy():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 95) == pytest.approx(95)


def test_summary_counts_goodput_and_compute_multiplier():
    results = [
        RequestResult(
            True, None, 0.0, ttft_s=0.5, e2e_s=1.0, itl_s=[0.1, 0.1], returned_tokens=10, generated_tokens=40
        ),
        RequestResult(True, None, 0.5, ttft_s=3.0, e2e_s=1.5, returned_tokens=10, generated_tokens=40),  # TTFT > SLO
        RequestResult(False, 429, 0.2, retry_after="2"),
    ]
    summary = summarize(results, Slo(ttft_s=2.0, e2e_s=10.0))
    assert summary["completed"] == 2 and summary["failed_by_status"] == {"429": 1}
    assert summary["wall_s"] == pytest.approx(2.0)  # first start 0.0, last end 0.5 + 1.5
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["output_tokens_per_s"] == pytest.approx(10.0) and summary["compute_multiplier"] == 4.0
    assert summary["goodput"] == pytest.approx(0.5) and summary["slo_attainment"] == pytest.approx(1 / 3)
    assert summary["itl_s"]["p50"] == pytest.approx(0.1)
