"""Ponder's overhead over raw vLLM for `single`, measured so the two are comparable request for request.

Both servers run the same model with the same engine arguments, one after the other (one engine at a time on a
small machine), and get the same greedy, streamed requests: the same prompts make the same tokens, so any
difference in latency is the serving layer's. Targets can repeat (`ponder,vllm,ponder`) to see the drift
between runs of one server, which bounds what a difference means.

    flock /tmp/ponder-engine.lock python -m loadtests.overhead --targets ponder,vllm,ponder --out runs/overhead

Prints one row per target and concurrency (medians of e2e latency, TTFT and inter-token latency; output
tokens/s) and writes them to `<out>/overhead.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import openai
from tqdm import tqdm

from loadtests.run_benchmark import ENGINE_ARGS, MODEL_NAME, model_dir, running_server

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain why the sky is blue in three sentences.",
    "List five uses of a paperclip.",
    "What is 17 * 23? Show your working.",
    "Describe a cat to someone who has never seen one.",
    "Give me a recipe for pancakes.",
    "Why do leaves change colour in autumn?",
    "Tell me a story about a robot who learns to paint.",
]


@dataclass(frozen=True)
class Sample:
    e2e_s: float
    ttft_s: float
    itl_s: float  # mean gap between content chunks after the first
    tokens: int


@dataclass(frozen=True)
class Row:
    target: str
    run: int
    concurrency: int
    requests: int
    e2e_p50_s: float
    ttft_p50_s: float
    itl_p50_ms: float
    output_tokens_per_s: float
    tokens_per_request: float


async def one_request(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> Sample:
    started = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    ended = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return Sample(ended - started, arrivals[0] - started, statistics.fmean(gaps) if gaps else 0.0, tokens)


async def measure(url: str, concurrency: int, requests: int, max_tokens: int) -> tuple[list[Sample], float]:
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600) as client:
        for prompt in PROMPTS[:2]:  # warm-up: prefix cache and first-request costs on both sides alike
            await one_request(client, prompt, max_tokens)
        todo = list(range(requests))
        samples: list[Sample] = []
        bar = tqdm(total=requests, desc=f"c={concurrency}", leave=False)

        async def worker() -> None:
            while todo:
                k = todo.pop()
                samples.append(await one_request(client, PROMPTS[k % len(PROMPTS)], max_tokens))
                bar.update()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        bar.close()
    return samples, wall


def row_of(target: str, run: int, concurrency: int, samples: list[Sample], wall: float) -> Row:
    tokens = sum(s.tokens for s in samples)
    return Row(
        target=target,
        run=run,
        concurrency=concurrency,
        requests=len(samples),
        e2e_p50_s=round(statistics.median(s.e2e_s for s in samples), 4),
        ttft_p50_s=round(statistics.median(s.ttft_s for s in samples), 4),
        itl_p50_ms=round(1000 * statistics.median(s.itl_s for s in samples), 2),
        output_tokens_per_s=round(tokens / wall, 1),
        tokens_per_request=round(tokens / len(samples), 1),
    )


def server_argv(target: str, port: int, model: str, trace_dir: str) -> list[str]:
    python = sys.executable
    if target == "vllm":
        argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        return [*argv, "--served-model-name", MODEL_NAME, "--port", str(port), *ENGINE_ARGS]
    argv = [python, "-m", "server", "serve", "--port", str(port), "--trace-dir", trace_dir]
    return [*argv, *ENGINE_ARGS, "--max-inflight-cost", "1000000"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="ponder,vllm,ponder", help="comma-separated: ponder | vllm, repeatable")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=32, help="per level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--port", type=int, default=18850)
    parser.add_argument("--out", type=Path, default=Path("runs/overhead"))
    parser.add_argument("--report-only", action="store_true", help="re-print the table and plot of <out>")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report([Row(**r) for r in json.loads((args.out / "overhead.json").read_text())], args.out)
        return 0
    model = model_dir()
    rows: list[Row] = []
    for run, target in enumerate(args.targets.split(",")):
        with tempfile.TemporaryDirectory(prefix="ponder-overhead-") as trace_dir:
            log = args.out / f"{run}-{target}.log"
            with running_server(server_argv(target, args.port, model, trace_dir), args.port, log):
                url = f"http://127.0.0.1:{args.port}/v1"
                for concurrency in (int(c) for c in args.concurrency.split(",")):
                    samples, wall = asyncio.run(measure(url, concurrency, args.requests, args.max_tokens))
                    rows.append(row_of(target, run, concurrency, samples, wall))
                    print(json.dumps(asdict(rows[-1])), flush=True)
    (args.out / "overhead.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    report(rows, args.out)
    return 0


def report(rows: list[Row], out: Path) -> None:
    print(markdown(rows))
    print()
    print(ratios(rows))
    plot(rows, out / "overhead.png")
    print(f"\nplot: {out / 'overhead.png'}")


def ratios(rows: list[Row]) -> str:
    """Ponder / vLLM per concurrency, each side the mean over its runs, and each side's own spread (max/min of
    its runs): a ratio inside the spread is not a difference."""
    lines = [
        "| c | e2e p50 ponder/vllm | output tok/s ponder/vllm | ponder run spread | vllm run spread |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in sorted({r.concurrency for r in rows}):
        side = {t: [r for r in rows if r.concurrency == c and r.target == t] for t in ("ponder", "vllm")}
        if not side["ponder"] or not side["vllm"]:
            continue
        e2e = {t: statistics.fmean(r.e2e_p50_s for r in rs) for t, rs in side.items()}
        tps = {t: statistics.fmean(r.output_tokens_per_s for r in rs) for t, rs in side.items()}
        spread = {t: max(r.e2e_p50_s for r in rs) / min(r.e2e_p50_s for r in rs) for t, rs in side.items()}
        lines.append(
            f"| {c} | {e2e['ponder'] / e2e['vllm']:.3f} | {tps['ponder'] / tps['vllm']:.3f} "
            f"| {spread['ponder']:.3f} | {spread['vllm']:.3f} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({r.concurrency for r in rows})
    fig, axes = plt.subplots(1, len(levels), figsize=(4.5 * len(levels), 4), squeeze=False)
    for axis, c in zip(axes[0], levels):
        for target, colour in (("ponder", "tab:blue"), ("vllm", "tab:orange")):
            runs = [r for r in rows if r.concurrency == c and r.target == target]
            axis.scatter([r.run for r in runs], [r.e2e_p50_s for r in runs], color=colour, label=target, s=40)
        axis.set_title(f"single, c={c}: e2e p50 per run")
        axis.set_xlabel("run (servers in the order they ran)")
        axis.set_ylabel("seconds")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[Row]) -> str:
    lines = [
        "| target (run) | c | e2e p50 s | TTFT p50 s | ITL p50 ms | output tok/s | tokens/request |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.target} ({r.run}) | {r.concurrency} | {r.e2e_p50_s:.3f} | {r.ttft_p50_s:.3f} | {r.itl_p50_ms:.1f} "
            f"| {r.output_tokens_per_s:.0f} | {r.tokens_per_request:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
