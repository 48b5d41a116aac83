"""The whole benchmark in one run: Ponder (every strategy, a sweep, Poisson arrivals, an overload burst), then
raw vLLM on the same model for `single`, so Ponder's overhead is a ratio. Writes JSON, a plot and a Markdown table.

Only one engine runs at a time; hold the machine's engine lock around it:

    flock /tmp/ponder-engine.lock python -m loadtests.run_benchmark --out loadtests/results/run1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from loadtests.loadgen import Scenario, Slo, StrategySpec, run_all

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "smollm2-135m-instruct"
# Ponder's CPU defaults, given to raw vLLM too so both engines are configured alike.
ENGINE_ARGS = ["--max-model-len", "4096", "--kv-cache-memory-bytes", str(2 * 2**30)]
# Admission sized for the sweep to pass unshed (16 x 64 tokens, 4 x 8 x 64) and the overload burst to be shed.
ADMISSION_ARGS = ["--max-inflight-cost", "4096", "--max-queued-requests", "16", "--max-queue-wait", "20"]


def sweep(spec: str, levels: Sequence[int], requests: int, seconds: float) -> list[Scenario]:
    strategy = StrategySpec.parse(spec)
    return [Scenario(strategy, concurrency=c, max_requests=max(requests, 2 * c), max_seconds=seconds) for c in levels]


def ponder_scenarios(small: bool) -> list[Scenario]:
    n, s = (12, 15.0) if small else (64, 60.0)
    few = [1, 4, 16] if small else [1, 2, 4, 8, 16]
    return [
        *sweep("single", [1, 2, 4, 8, 16], n, s),
        Scenario(StrategySpec("single"), rate=2.0, max_requests=2 * n, max_seconds=s),
        *sweep("best_of_n:n=4", few, n, s),
        *sweep("best_of_n:n=8", few[:2] if small else few, n, s),
        *sweep("self_consistency:n=4", few, n, s),
    ]


def overload_scenario(small: bool) -> Scenario:
    """Arrivals far above capacity: the queue fills, the rest is shed; admitted requests' latency stays bounded."""
    return Scenario(StrategySpec.parse("best_of_n:n=4"), rate=8.0, max_requests=160, max_seconds=20 if small else 60)


def vllm_scenarios(small: bool) -> list[Scenario]:
    return [s for s in ponder_scenarios(small) if s.strategy.name == "single"]


# ---------------------------------------------------------------------------------------------- servers
@contextlib.contextmanager
def running_server(argv: list[str], port: int, log_path: Path) -> Iterator[subprocess.Popen]:
    """Start in a session of its own; SIGTERM the server alone (it drains and stops its engine), then check
    that nothing of its session is left, killing whatever is."""
    log = open(log_path, "wb")  # noqa: SIM115 (closed below)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(proc, port, log_path)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
        left = session_processes(proc.pid)
        if left:
            print(f"left behind by {argv[2]}: {left}; killing", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def session_processes(sid: int) -> list[int]:
    import psutil

    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
    return found


def wait_healthy(proc: subprocess.Popen, port: int, log_path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {timeout} s; see {log_path}")


def model_dir() -> str:
    from server.model_registry import resolve_model

    return str(resolve_model(None).path)


# ---------------------------------------------------------------------------------------------- the run
def run_target(
    label: str, argv: list[str], port: int, scenarios: list[Scenario], raw: bool, out: Path, slo: Slo
) -> list[dict[str, Any]]:
    print(f"== {label}: {' '.join(argv)}", flush=True)
    started = time.monotonic()
    with running_server(argv, port, out / f"{label}.log"):
        print(f"   healthy after {time.monotonic() - started:.0f} s", flush=True)
        url = f"http://127.0.0.1:{port}/v1"
        rows = asyncio.run(run_all(url, MODEL_NAME, "unused", scenarios, raw, slo))
    return [{"target": label, **row} for row in rows]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.run_benchmark")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results") / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--full", action="store_true", help="every concurrency for every strategy, longer levels")
    parser.add_argument("--port", type=int, default=18790)
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args(argv)
    small = not args.full
    args.out.mkdir(parents=True, exist_ok=True)
    slo = Slo()
    model = model_dir()
    python = sys.executable
    trace_dir = tempfile.mkdtemp(prefix="ponder-bench-traces-")
    ponder_argv = [python, "-m", "server", "serve", "--port", str(args.port), "--trace-dir", trace_dir]
    ponder_argv += ENGINE_ARGS + ADMISSION_ARGS
    scenarios = [*ponder_scenarios(small), overload_scenario(small)]
    rows = run_target("ponder", ponder_argv, args.port, scenarios, False, args.out, slo)
    rows[-1]["scenario"] = "overload: " + rows[-1]["scenario"]
    if not args.skip_vllm:
        vllm_argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        vllm_argv += ["--served-model-name", MODEL_NAME, "--port", str(args.port + 1), *ENGINE_ARGS]
        rows += run_target("vllm", vllm_argv, args.port + 1, vllm_scenarios(small), True, args.out, slo)
    result = {"slo": asdict(slo), "small": small, "created": time.time(), "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    from loadtests.report import markdown_tables, plot

    (args.out / "results.md").write_text(markdown_tables(result))
    plot(result, args.out / "results.png")
    print(markdown_tables(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
