"""Latency and throughput of `single` and best-of-8 against one OpenAI-compatible server, at concurrency 1 and 8.

Run it against raw vLLM (`--raw`: best-of-8 is one `n=8` chat request), Ponder in front of it (`--upstream`), and
Ponder in-process, with the same model, to see what the Ponder layer and the remote hop cost:

    python loadtests/remote_overhead.py --base-url http://127.0.0.1:8000/v1 --label ponder-remote
    python loadtests/remote_overhead.py --base-url http://127.0.0.1:8001/v1 --label raw-vllm --raw
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import openai

QUESTION = "What is 17 + 25? Answer briefly."


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: openai.AsyncOpenAI, model: str, case: str, raw: bool, max_tokens: int) -> float:
    extra: dict[str, Any] = {}
    n = 1
    if case == "best_of_8":
        if raw:
            n = 8
        else:
            extra = {"strategy": {"name": "best_of_n", "n": 8}}
    started = time.monotonic()
    await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=max_tokens,
        temperature=0.8,
        n=n,
        extra_body=extra or None,
    )
    return time.monotonic() - started


async def run_case(
    client: openai.AsyncOpenAI, model: str, case: str, concurrency: int, requests: int, raw: bool, max_tokens: int
) -> dict[str, Any]:
    queue = list(range(requests))
    latencies: list[float] = []

    async def worker() -> None:
        while queue:
            queue.pop()
            latencies.append(await one_request(client, model, case, raw, max_tokens))

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.monotonic() - started
    return {
        "case": case,
        "concurrency": concurrency,
        "requests": requests,
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(percentile(latencies, 0.95), 3),
        "requests_per_s": round(requests / wall, 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--raw", action="store_true", help="a plain vLLM server: best-of-8 is n=8")
    parser.add_argument("--requests", type=int, default=8, help="per case and concurrency")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    async with openai.AsyncOpenAI(base_url=args.base_url, api_key="x", max_retries=0, timeout=600) as client:
        model = (await client.models.list()).data[0].id
        await one_request(client, model, "single", args.raw, args.max_tokens)  # warm-up
        for case in ("single", "best_of_8"):
            for concurrency in (1, 8):
                row = await run_case(client, model, case, concurrency, args.requests, args.raw, args.max_tokens)
                print(json.dumps({"label": args.label, **row}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
