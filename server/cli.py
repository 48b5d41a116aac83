"""The `ponder` command: `serve`, `pull`, `eval`, `distill`, `loop`.

`ponder serve` takes every vLLM engine flag (vLLM's own parser declares them), plus Ponder's few. Only `serve`
imports vLLM, so `ponder eval` against a remote server starts in a blink.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from server.model_registry import DEFAULT_MODEL, EMBEDDED_MODELS, resolve_model
from server.settings import TRACE_CONTENT_MODES, ServerSettings

logger = logging.getLogger("ponder")

USAGE = """usage: ponder {serve,pull,eval,distill,loop,heads} ...

  serve    start the OpenAI-compatible server (ponder serve --help)
  pull     materialize an embedded model into the cache (ponder pull --help)
  eval     run the evaluation harness against a running server (ponder eval --help)
  distill  fine-tune a model on selected traces (ponder distill --help)
  loop     N rounds of bootstrap -> distill -> evaluate, end to end (ponder loop --help)
  heads    bootstrap traces and train the introspection heads (ponder heads --help)
"""

CPU_KV_CACHE_BYTES = 2 * 2**30  # the CPU engine would otherwise reserve a fraction of all RAM
CPU_MAX_MODEL_LEN = 4096  # bounds prefill memory on CPU; pass --max-model-len to change it


def add_ponder_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ponder")
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--default-strategy", default="single", help="strategy for requests that name none")
    group.add_argument("--trace-dir", type=Path, default=Path("traces"), help="trace journal directory")
    group.add_argument("--max-samples-per-request", type=int, default=16)
    group.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens a request may ask")
    group.add_argument("--heartbeat-interval", type=float, default=2.0, help="seconds between SSE heartbeats")
    group.add_argument("--request-timeout", type=float, default=None, help="per-request deadline in seconds")
    security = parser.add_argument_group("Ponder security and limits")
    security.add_argument(
        "--api-key", action="append", default=None, help="a valid API key (repeatable; also env PONDER_API_KEY)"
    )
    security.add_argument("--api-keys-file", type=Path, default=None, help="a file of API keys, one per line")
    security.add_argument("--metrics-require-auth", action="store_true", help="/metrics needs an API key too")
    security.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body (413 beyond)")
    security.add_argument("--max-messages", type=int, default=256, help="most messages in a chat request")
    security.add_argument(
        "--trace-content",
        choices=TRACE_CONTENT_MODES,
        default="keep",
        help="message and answer text in traces: keep, hash (sha256) or drop",
    )
    security.add_argument(
        "--no-mask-secrets",
        dest="mask_secrets",
        action="store_false",
        help="do not mask API keys, bearer tokens and sk-... keys in traces and logs",
    )
    security.add_argument(
        "--rate-limit-rpm",
        type=int,
        default=None,
        help="requests per minute per API key (per client address without keys); default: no limit",
    )
    security.add_argument(
        "--rate-limit-tpm",
        type=int,
        default=None,
        help="tokens (samples x max_tokens) per minute per API key (or address); default: no limit",
    )
    admission = parser.add_argument_group("Ponder admission control and shutdown")
    admission.add_argument(
        "--max-inflight-cost",
        type=int,
        default=65536,
        help="tokens (samples x max_tokens) admitted requests may have in flight; the rest queue",
    )
    admission.add_argument("--max-queued-requests", type=int, default=64, help="queue length; beyond it a 429")
    admission.add_argument("--max-queue-wait", type=float, default=30.0, help="seconds in the queue before a 503")
    admission.add_argument(
        "--drain-timeout", type=float, default=30.0, help="SIGTERM: seconds in-flight requests may take to finish"
    )
    remote = parser.add_argument_group("Ponder remote upstreams (instead of the in-process engine)")
    remote.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="URL",
        help="an OpenAI-compatible server to sample from, e.g. http://host:8000/v1 (repeat for several); "
        "--model then only supplies the tokenizer and chat template",
    )
    remote.add_argument(
        "--upstream-kind",
        choices=("auto", "vllm", "openai"),
        default="auto",
        help="vllm: token ids and vLLM's extra fields; openai: text prompts, no token-id or tracked log-prob "
        "strategies; auto: vllm if the upstream's /models lists max_model_len",
    )
    remote.add_argument("--upstream-timeout", type=float, default=600.0, help="seconds one upstream call may take")
    remote.add_argument(
        "--upstream-max-retries", type=int, default=0, help="the openai client's retries of a call on one upstream"
    )
    remote.add_argument(
        "--upstream-api-key-env",
        default="PONDER_UPSTREAM_API_KEY",
        help="environment variable holding the upstreams' API key (default: none sent)",
    )


def build_serve_parser() -> argparse.ArgumentParser:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="ponder serve", description="Serve a model with test-time strategies.")
    AsyncEngineArgs.add_cli_args(parser)
    add_ponder_args(parser)
    parser.set_defaults(model=None)
    for action in parser._actions:
        if action.dest == "model":
            action.help = (
                f"an embedded model ({', '.join(EMBEDDED_MODELS)}; default {DEFAULT_MODEL}) or a local "
                "transformers model directory"
            )
    return parser


def engine_args_from(args: argparse.Namespace, model_path: str, served_name: str):
    """vLLM's engine arguments with CPU-safe defaults where the user left vLLM's own."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    args.model = model_path
    args.served_model_name = [served_name]
    engine_args = AsyncEngineArgs.from_cli_args(args)
    if current_platform.is_cpu():
        if engine_args.kv_cache_memory_bytes is None and engine_args.gpu_memory_utilization == 0.92:
            engine_args.kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        if engine_args.max_model_len is None:
            engine_args.max_model_len = CPU_MAX_MODEL_LEN
    return engine_args


def serve(argv: list[str]) -> int:

    from server.app import create_app
    from server.prompt_rendering import HFPromptRenderer
    from server.redaction import Redactor, install_log_masking
    from server.security import collect_api_keys
    from server.vllm_engine import VllmEngine

    args = build_serve_parser().parse_args(argv)
    log_level = str(getattr(args, "log_level", "info")).lower()  # vLLM's own --log-level
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_keys = collect_api_keys(args.api_key, args.api_keys_file)
    if args.mask_secrets:
        install_log_masking(Redactor(mask=True, known_secrets=api_keys))
    resolved = resolve_model(args.model)
    if args.upstream:
        return serve_remote(args, resolved, log_level, api_keys)
    served_name = (args.served_model_name or [resolved.served_name])[0]
    engine_args = engine_args_from(args, str(resolved.path), served_name)
    settings = settings_from(args, str(resolved.path), served_name, api_keys)
    logger.info("API keys: %s", f"{len(api_keys)} configured" if api_keys else "none (every request is accepted)")
    from server.strategy_selection import build_strategies

    if settings.default_strategy not in build_strategies():
        print(f"unknown --default-strategy {settings.default_strategy!r}", file=sys.stderr)
        return 2
    app = create_app(
        settings,
        engine_factory=lambda: VllmEngine.start(engine_args),
        renderer_factory=lambda: HFPromptRenderer.from_model_dir(settings.model_path),
    )
    return run_draining(app, settings, log_level)


def run_draining(app, settings: ServerSettings, log_level: str) -> int:
    """uvicorn with SIGTERM draining (readiness 503, in-flight requests finish), then every child reaped."""
    import uvicorn

    from server.shutdown import DrainingServer, reap_children

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=log_level, timeout_graceful_shutdown=5
    )
    try:
        DrainingServer(config, drain_timeout_s=settings.drain_timeout_s).run()
    finally:
        reap_children()
    return 0


def settings_from(
    args: argparse.Namespace, model_path: str, served_name: str, api_keys: tuple[str, ...]
) -> ServerSettings:
    return ServerSettings(
        model_path=model_path,
        served_model_name=served_name,
        host=args.host,
        port=args.port,
        default_strategy=args.default_strategy,
        trace_dir=args.trace_dir,
        max_samples_per_request=args.max_samples_per_request,
        max_tokens_cap=args.max_tokens_cap,
        heartbeat_interval_s=args.heartbeat_interval,
        request_timeout_s=args.request_timeout,
        api_keys=api_keys,
        metrics_require_auth=args.metrics_require_auth,
        max_body_bytes=args.max_body_bytes,
        max_messages=args.max_messages,
        trace_content=args.trace_content,
        mask_secrets=args.mask_secrets,
        max_inflight_cost=args.max_inflight_cost,
        max_queued_requests=args.max_queued_requests,
        max_queue_wait_s=args.max_queue_wait,
        drain_timeout_s=args.drain_timeout,
        rate_limit_requests_per_minute=args.rate_limit_rpm,
        rate_limit_tokens_per_minute=args.rate_limit_tpm,
    )


def serve_remote(args: argparse.Namespace, resolved, log_level: str, api_keys: tuple[str, ...]) -> int:
    """`ponder serve --upstream URL ...`: no local engine; the model directory supplies tokenizer and template.

    The served name and context come from the first upstream that answers GET /models (`--served-model-name`
    and `--max-model-len` override them)."""
    import os

    from transformers import AutoTokenizer

    from server.app import create_app
    from server.introspection import IntrospectionHeads
    from server.prompt_rendering import HFPromptRenderer
    from server.remote_engine import RemoteEngine, discover_upstream
    from server.strategy_selection import build_strategies

    api_key = os.environ.get(args.upstream_api_key_env) or "unused"
    info, failures = None, []
    for url in args.upstream:
        try:
            info = discover_upstream(url, api_key)
            break
        except Exception as exc:
            failures.append(f"{url}: {exc}")
    if info is None:
        print(f"no upstream answered GET /models: {'; '.join(failures)}", file=sys.stderr)
        return 2
    kind = info.kind if args.upstream_kind == "auto" else args.upstream_kind
    max_model_len = args.max_model_len or info.max_model_len
    if not max_model_len:
        print("the upstream does not list max_model_len: pass --max-model-len", file=sys.stderr)
        return 2
    served_name = (args.served_model_name or [info.model])[0]
    settings = settings_from(args, str(resolved.path), served_name, api_keys)
    if settings.default_strategy not in build_strategies():
        print(f"unknown --default-strategy {settings.default_strategy!r}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
    logger.info("upstreams %s (%s, model %s, context %d)", args.upstream, kind, info.model, max_model_len)

    def engine_factory() -> RemoteEngine:
        return RemoteEngine.connect(
            args.upstream,
            api_key=api_key,
            timeout_s=args.upstream_timeout,
            max_retries=args.upstream_max_retries,
            model_name=served_name,
            upstream_model=info.model,
            max_model_len=int(max_model_len),
            kind=kind,
            decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False),
            encode=lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
            introspection=IntrospectionHeads.load(settings.model_path),
        )

    app = create_app(settings, engine_factory=engine_factory, renderer_factory=lambda: HFPromptRenderer(tokenizer))
    return run_draining(app, settings, log_level)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "pull":
        from server.model_registry import main as pull_main

        return pull_main(["pull", *rest])
    if command == "eval":
        from training.evaluate import main as eval_main

        return eval_main(rest)
    if command == "distill":
        from training.distill import cli as distill_cli

        return distill_cli(rest)
    if command == "heads":
        from training.heads import main as heads_main

        return heads_main(rest)
    if command == "loop":
        from training.loop import main as loop_main

        return loop_main(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # `python -m server.cli` works like `python -m server`
    raise SystemExit(main())
