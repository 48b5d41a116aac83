"""Tables and a plot from a benchmark's results.json (`python -m loadtests.report results.json`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def ms(value: float | None) -> str:
    return fmt(value, 1000, 0)


def ratio(a: float | None, b: float | None) -> str:
    return "–" if not a or not b else f"{a / b:.3f}"


def overhead_table(rows: list[dict[str, Any]]) -> list[str]:
    """`single` on Ponder against raw vLLM, scenario by scenario."""
    vllm = {r["scenario"]: r for r in rows if r["target"] == "vllm"}
    lines = [
        "| load | vLLM e2e p50 ms | Ponder e2e p50 ms | ratio | vLLM tok/s | Ponder tok/s | ratio | "
        "vLLM TTFT p50 ms | Ponder TTFT p50 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in rows:
        v = vllm.get(p["scenario"])
        if p["target"] != "ponder" or v is None:
            continue
        lines.append(
            f"| {p['scenario']} | {ms(v['e2e_s']['p50'])} | {ms(p['e2e_s']['p50'])} | "
            f"{ratio(p['e2e_s']['p50'], v['e2e_s']['p50'])} | {fmt(v['output_tokens_per_s'], digits=1)} | "
            f"{fmt(p['output_tokens_per_s'], digits=1)} | "
            f"{ratio(p['output_tokens_per_s'], v['output_tokens_per_s'])} | {ms(v['ttft_s']['p50'])} | "
            f"{ms(p['ttft_s']['p50'])} |"
        )
    return lines


def full_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| target | scenario | ok/sent | failed | req/s | out tok/s | gen tok/s | TTFT p50/p95 ms | ITL p50 ms | "
        "e2e p50/p95/p99 ms | goodput req/s | compute x |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        failed = ", ".join(f"{k}: {v}" for k, v in r["failed_by_status"].items()) or "0"
        lines.append(
            f"| {r['target']} | {r['scenario']} | {r['completed']}/{r['requests']} | {failed} | "
            f"{fmt(r['request_throughput'])} | {fmt(r['output_tokens_per_s'], digits=1)} | "
            f"{fmt(r['generated_tokens_per_s'], digits=1)} | {ms(r['ttft_s']['p50'])}/{ms(r['ttft_s']['p95'])} | "
            f"{ms(r['itl_s']['p50'])} | {ms(r['e2e_s']['p50'])}/{ms(r['e2e_s']['p95'])}/{ms(r['e2e_s']['p99'])} | "
            f"{fmt(r['goodput'])} | {fmt(r['compute_multiplier'], digits=1)} |"
        )
    return lines


def overload_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        if not r["scenario"].startswith("overload"):
            continue
        sent = r["requests"]
        shed = r["failed_by_status"]
        lines.append(
            f"Overload ({r['scenario'].removeprefix('overload: ')}, {sent} requests): "
            f"{shed.get('429', 0) / sent:.0%} got 429, {shed.get('503', 0) / sent:.0%} got 503, "
            f"{r['completed']} completed with e2e p50 {ms(r['e2e_s']['p50'])} ms, p99 {ms(r['e2e_s']['p99'])} ms."
        )
    return lines


def markdown_tables(result: dict[str, Any]) -> str:
    rows = result["rows"]
    slo = result["slo"]
    parts = [
        "Ponder `single` against raw vLLM (ratio = Ponder / vLLM):",
        "",
        *overhead_table(rows),
        "",
        f"Every scenario (goodput: completed requests per second with TTFT <= {slo['ttft_s']} s and "
        f"e2e <= {slo['e2e_s']} s):",
        "",
        *full_table(rows),
        "",
        *overload_lines(rows),
    ]
    return "\n".join(parts) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for r in result["rows"]:
        if r.get("concurrency") is None:
            continue
        label = f"{r['target']}: {r['scenario'].rsplit(' c=', 1)[0]}"
        series.setdefault(label, []).append((r["concurrency"], r))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, points in series.items():
        points.sort(key=lambda p: p[0])
        xs = [c for c, _ in points]
        style = "--" if label.startswith("vllm") else "-"
        left.plot(xs, [r["e2e_s"]["p50"] for _, r in points], style, marker="o", label=label)
        right.plot(xs, [r["output_tokens_per_s"] for _, r in points], style, marker="o", label=label)
    for axis, title in ((left, "end-to-end latency p50 (s)"), (right, "returned tokens per second")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent requests")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    left.set_yscale("log")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0])
    result = json.loads(path.read_text())
    print(markdown_tables(result))
    plot(result, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
