"""What reading the introspection heads at every token costs: the same engine, the same prompts, with and without
`logprob_token_ids` for the R x L head rows (the rows are masked from sampling in both arms).

    flock /tmp/ponder-engine.lock .venv/bin/python loadtests/introspection_overhead.py --model runs/heads/model

Prints generated tokens per second for each arm, over alternating rounds so drift in the machine's load hits
both alike, and writes a JSON next to the model unless --output is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path

from server.engine import SamplingOptions

PROMPTS = [
    "What is 7 * 8? Think step by step.",
    "Write a short story about a robot that learns to paint.",
    "Explain why the sky is blue.",
    "List five prime numbers and say why each is prime.",
]


async def one_round(engine, renderer, tracked: tuple[int, ...], concurrency: int, max_tokens: int) -> tuple[int, float]:
    options = SamplingOptions(max_tokens=max_tokens, temperature=0.8, logprob_token_ids=tracked)
    prompts = [renderer.chat_ids([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(concurrency)]
    started = time.perf_counter()
    results = await asyncio.gather(*(engine.generate(p, options, 1, f"bench-{uuid.uuid4().hex}") for p in prompts))
    elapsed = time.perf_counter() - started
    return sum(g.num_tokens for (g,) in results), elapsed


async def measure(args: argparse.Namespace) -> dict:
    from server.cli import build_serve_parser, engine_args_from
    from server.prompt_rendering import HFPromptRenderer
    from server.vllm_engine import VllmEngine

    serve_args = build_serve_parser().parse_args(["--model", args.model, "--max-model-len", "1024"])
    engine = VllmEngine.start(engine_args_from(serve_args, args.model, Path(args.model).name))
    if engine.introspection is None:
        raise SystemExit(f"{args.model} has no introspection heads")
    renderer = HFPromptRenderer.from_model_dir(args.model)
    arms = {"without heads read": (), "with heads read": engine.introspection.token_ids}
    rates: dict[str, list[float]] = {name: [] for name in arms}
    try:
        await one_round(engine, renderer, (), args.concurrency, 16)  # warm-up
        for _ in range(args.rounds):
            for name, tracked in arms.items():
                tokens, seconds = await one_round(engine, renderer, tracked, args.concurrency, args.max_tokens)
                rates[name].append(tokens / seconds)
                print(f"{name:>20}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s")
    finally:
        await engine.shutdown()
    summary = {name: {"median_tok_s": statistics.median(r), "rounds": r} for name, r in rates.items()}
    base, read = (summary[name]["median_tok_s"] for name in arms)
    summary["ratio"] = read / base
    print(f"median: {base:.1f} tok/s without, {read:.1f} tok/s with the heads read (ratio {read / base:.3f})")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model directory with introspection heads")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4, help="requests generated together per round")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--output", default=None, help="JSON path (default: MODEL/introspection-overhead.json)")
    args = parser.parse_args()
    summary = asyncio.run(measure(args))
    output = Path(args.output or Path(args.model) / "introspection-overhead.json")
    output.write_text(json.dumps({"args": vars(args), **summary}, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
