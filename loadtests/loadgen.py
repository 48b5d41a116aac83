"""An async load generator for any OpenAI-compatible server (Ponder, or raw vLLM for comparison).

Each request streams (`stream=True`, `stream_options.include_usage`), so time to first token is what a client
sees. A scenario is a strategy at a fixed concurrency (closed loop) or at a Poisson arrival rate (open loop),
bounded by a request count and a time limit. Definitions of every reported number: loadtests/README.md.

    python -m loadtests.loadgen --base-url http://127.0.0.1:8000/v1 --strategy best_of_n:n=4 --concurrency 1 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai

# Short prompts with short answers: a 135M model on two cores answers each in about a second.
PROMPTS = (
    "What is 7 * 8? Answer with the number.",
    "Name three primary colors.",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "What is 12 + 30? Answer with the number.",
    "List two animals that can fly.",
    "What is the opposite of cold?",
    "Say hello in Spanish.",
)


@dataclass(frozen=True)
class Slo:
    """A request counts toward goodput when it meets both."""

    ttft_s: float = 2.0
    e2e_s: float = 10.0


@dataclass(frozen=True)
class StrategySpec:
    """`single`, or `best_of_n:n=4`, `self_consistency:n=8,temperature=0.8` (Ponder's body `strategy`)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> StrategySpec:
        name, _, rest = text.partition(":")
        options: dict[str, Any] = {}
        for pair in filter(None, rest.split(",")):
            key, _, value = pair.partition("=")
            options[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
        return cls(name, options)

    @property
    def label(self) -> str:
        return self.name + "".join(f" {k}={v}" for k, v in self.options.items())


@dataclass
class RequestResult:
    ok: bool
    status: int | None  # HTTP status of a failure (429, 503...), None for a connection error
    start_s: float  # since the scenario started
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between content chunks
    returned_tokens: int = 0  # completion tokens the client got back
    generated_tokens: int = 0  # every token generated for it (Ponder: samples and judges)
    retry_after: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Scenario:
    strategy: StrategySpec
    concurrency: int | None = None  # closed loop: this many requests in flight
    rate: float | None = None  # open loop: Poisson arrivals per second
    max_requests: int = 32
    max_seconds: float = 30.0
    max_tokens: int = 64

    @property
    def label(self) -> str:
        load = f"c={self.concurrency}" if self.concurrency is not None else f"rate={self.rate:g}/s"
        return f"{self.strategy.label} {load}"


def request_body(scenario: Scenario, prompt: str, raw_vllm: bool) -> dict[str, Any]:
    """Temperature 0 for `single`, so Ponder and raw vLLM generate the same tokens; never a `seed`."""
    extra: dict[str, Any] = {}
    if not raw_vllm:
        extra["strategy"] = {"name": scenario.strategy.name, **scenario.strategy.options}
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": scenario.max_tokens,
        "temperature": 0.0 if scenario.strategy.name == "single" else 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "extra_body": extra or None,
    }


async def one_request(
    client: openai.AsyncOpenAI, model: str, body: dict[str, Any], scenario_start: float
) -> RequestResult:
    started = time.perf_counter()
    result = RequestResult(ok=False, status=None, start_s=started - scenario_start)
    last_chunk: float | None = None
    try:
        stream = await client.chat.completions.create(model=model, **body)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                details = chunk.usage.completion_tokens_details
                hidden = (details.reasoning_tokens or 0) if details else 0
                result.generated_tokens = chunk.usage.completion_tokens
                result.returned_tokens = chunk.usage.completion_tokens - hidden
            if any(choice.delta.content for choice in chunk.choices):
                if result.ttft_s is None:
                    result.ttft_s = now - started
                elif last_chunk is not None:
                    result.itl_s.append(now - last_chunk)
                last_chunk = now
        result.e2e_s = time.perf_counter() - started
        result.ok = True
    except openai.APIStatusError as exc:
        result.status, result.error = exc.status_code, exc.message[:200]
        result.retry_after = exc.response.headers.get("retry-after")
    except openai.APIError as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    return result


async def run_scenario(
    client: openai.AsyncOpenAI, model: str, scenario: Scenario, raw_vllm: bool = False, seed: int = 0
) -> list[RequestResult]:
    """Closed loop (`concurrency`) or Poisson arrivals (`rate`); no new request after max_requests/max_seconds."""
    rng = random.Random(seed)
    start = time.perf_counter()
    sent = 0

    def next_body() -> dict[str, Any] | None:
        nonlocal sent
        if sent >= scenario.max_requests or time.perf_counter() - start >= scenario.max_seconds:
            return None
        sent += 1
        return request_body(scenario, PROMPTS[(sent - 1) % len(PROMPTS)], raw_vllm)

    results: list[RequestResult] = []
    if scenario.concurrency is not None:

        async def worker() -> None:
            while (body := next_body()) is not None:
                results.append(await one_request(client, model, body, start))

        await asyncio.gather(*(worker() for _ in range(scenario.concurrency)))
        return results
    assert scenario.rate is not None
    tasks = []
    while (body := next_body()) is not None:
        tasks.append(asyncio.create_task(one_request(client, model, body, start)))
        await asyncio.sleep(rng.expovariate(scenario.rate))
    return list(await asyncio.gather(*tasks))


# ---------------------------------------------------------------------------------------------- the report
def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(results: Sequence[RequestResult], slo: Slo) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    if done:
        first = min(r.start_s for r in results)
        wall = max(r.start_s + (r.e2e_s or 0) for r in done) - first
    else:
        wall = 0.0
    e2e = [r.e2e_s for r in done if r.e2e_s is not None]
    ttft = [r.ttft_s for r in done if r.ttft_s is not None]
    itl = [gap for r in done for gap in r.itl_s]
    returned = sum(r.returned_tokens for r in done)
    generated = sum(r.generated_tokens for r in done)
    good = [r for r in done if (r.ttft_s or 0) <= slo.ttft_s and (r.e2e_s or 0) <= slo.e2e_s]

    def quantiles(values: Sequence[float]) -> dict[str, float | None]:
        return {f"p{q}": percentile(values, q) for q in (50, 95, 99)} | {
            "mean": statistics.fmean(values) if values else None
        }

    statuses: dict[str, int] = {}
    for r in failed:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {
        "requests": len(results),
        "completed": len(done),
        "failed": len(failed),
        "failed_by_status": statuses,
        "wall_s": wall,
        "request_throughput": len(done) / wall if wall else None,
        "output_tokens_per_s": returned / wall if wall else None,
        "generated_tokens_per_s": generated / wall if wall else None,
        "goodput": len(good) / wall if wall else None,
        "slo_attainment": len(good) / len(results) if results else None,
        "compute_multiplier": generated / returned if returned else None,
        "ttft_s": quantiles(ttft),
        "itl_s": quantiles(itl),
        "e2e_s": quantiles(e2e),
    }


async def run_all(
    base_url: str, model: str | None, api_key: str, scenarios: Sequence[Scenario], raw_vllm: bool, slo: Slo
) -> list[dict[str, Any]]:
    timeout = openai.Timeout(300, connect=10)
    async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout) as client:
        model = model or (await client.models.list()).data[0].id
        rows = []
        for scenario in scenarios:
            results = await run_scenario(client, model, scenario, raw_vllm)
            summary = summarize(results, slo)
            rows.append({"scenario": scenario.label, **asdict(scenario), **summary})
            print(format_row(rows[-1]), flush=True)
        return rows


def format_row(row: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    tput = row["output_tokens_per_s"] or 0
    mult = row["compute_multiplier"] or 0
    return (
        f"{row['scenario']:<32} ok {row['completed']:>3}/{row['requests']:<3} {row['request_throughput'] or 0:6.2f} "
        f"req/s {tput:7.1f} tok/s  ttft p50 {ms(row['ttft_s']['p50'])} ms  itl p50 {ms(row['itl_s']['p50'])} ms  "
        f"e2e p50/p95/p99 {ms(row['e2e_s']['p50'])}/{ms(row['e2e_s']['p95'])}/{ms(row['e2e_s']['p99'])} ms  "
        f"x{mult:.1f}  failed {row['failed_by_status'] or 0}"
    )


def build_scenarios(args: argparse.Namespace) -> list[Scenario]:
    scenarios = []
    for text in args.strategy:
        spec = StrategySpec.parse(text)
        common = {"max_requests": args.max_requests, "max_seconds": args.max_seconds, "max_tokens": args.max_tokens}
        scenarios += [Scenario(spec, concurrency=c, **common) for c in args.concurrency]
        scenarios += [Scenario(spec, rate=r, **common) for r in args.rate]
    return scenarios


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--strategy", nargs="+", default=["single"], help="e.g. single best_of_n:n=4")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rate", type=float, nargs="*", default=[], help="Poisson arrival rates (req/s)")
    parser.add_argument("--max-requests", type=int, default=32, help="per scenario")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="per scenario: no new request after")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--raw-vllm", action="store_true", help="the target is plain vLLM: no strategy field")
    parser.add_argument("--slo-ttft", type=float, default=Slo.ttft_s)
    parser.add_argument("--slo-e2e", type=float, default=Slo.e2e_s)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    slo = Slo(args.slo_ttft, args.slo_e2e)
    rows = asyncio.run(run_all(args.base_url, args.model, args.api_key, build_scenarios(args), args.raw_vllm, slo))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"slo": asdict(slo), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
