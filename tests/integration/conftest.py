"""A real `ponder serve` for the integration suite, in the spirit of vLLM's `RemoteOpenAIServer`.

One server (the embedded model, small flags) is started once per session in its own process group, so teardown
can signal the server and every child it spawned (vLLM's EngineCore) together, and check that none is left.

Only one vLLM engine fits on a small CI machine: run this suite under `flock /tmp/ponder-engine.lock`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil  # vLLM's own dependency
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
PONDER = Path(sys.executable).with_name("ponder")

# Small, fast settings. The caps are chosen apart from each other so each 400 is unambiguous:
# a 2048-token context, at most 512 tokens per sample, at most 16 samples per request.
MAX_MODEL_LEN = 2048
MAX_TOKENS_CAP = 512
MAX_SAMPLES = 16
HEARTBEAT_S = 0.5
SERVER_ARGS = [
    "--max-model-len",
    str(MAX_MODEL_LEN),
    "--max-tokens-cap",
    str(MAX_TOKENS_CAP),
    "--max-samples-per-request",
    str(MAX_SAMPLES),
    "--heartbeat-interval",
    str(HEARTBEAT_S),
]
STARTUP_TIMEOUT_S = 300.0
SHUTDOWN_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RemoteOpenAIServer:
    """`ponder serve` as a subprocess: started in its own session, torn down group-wide."""

    def __init__(self, args: list[str], trace_dir: Path, log_path: Path, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.trace_dir = trace_dir
        self.log_path = log_path
        self.argv = [str(PONDER), "serve", "--host", self.host, "--port", str(self.port), "--trace-dir", str(trace_dir)]
        self.argv += args
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.pgid = self.proc.pid  # start_new_session: the server leads its own process group
        self._processes: dict[int, psutil.Process] = {}
        self._stopped = False
        self.killed: list[int] = []  # what needed SIGKILL at teardown (for the report)

    # -- addresses and clients
    @property
    def url_root(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_for(self, *parts: str) -> str:
        return "/".join([self.url_root, *(p.strip("/") for p in parts)])

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("timeout", 300)
        return openai.OpenAI(base_url=self.url_for("v1"), api_key="x", max_retries=0, **kwargs)

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("timeout", 300)
        return openai.AsyncOpenAI(base_url=self.url_for("v1"), api_key="x", max_retries=0, **kwargs)

    def http(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 300)
        return httpx.Client(base_url=self.url_root, **kwargs)

    # -- lifecycle
    def log_tail(self, lines: int = 60) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "<no log>"

    def wait_until_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"ponder serve exited with {code} during start-up:\n{self.log_tail()}")
            self._remember_children()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url_for("health"), timeout=5).status_code == 200:
                    self._remember_children()
                    return
            time.sleep(1)
        raise RuntimeError(f"ponder serve not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def group_processes(self) -> dict[int, psutil.Process]:
        """Live processes of the server's process group or session: the server, EngineCore and its workers."""
        found = {}
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if (os.getpgid(proc.pid) == self.pgid or os.getsid(proc.pid) == self.pgid) and not _exited(proc):
                    found[proc.pid] = proc
        return found

    def _remember_children(self) -> None:
        self._processes.update(self.group_processes())

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def _alive(self) -> list[psutil.Process]:
        """Every process of the group, or seen in it since start, that has not exited (psutil.Process objects
        remember their start time, so a recycled pid is not mistaken for ours)."""
        self._remember_children()
        return [proc for proc in self._processes.values() if not _exited(proc)]

    def _wait_gone(self, timeout: float) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        while True:
            self.proc.poll()  # reap the server itself
            alive = self._alive()
            if not alive or time.monotonic() >= deadline:
                return alive
            time.sleep(0.2)

    def stop(self) -> list[int]:
        """SIGTERM the group, give it (server and engine processes) 30 s to exit, then SIGKILL what is left.

        Returns the pids still alive after that: there should be none."""
        if self._stopped:
            return []
        self._stopped = True
        self._remember_children()
        self._signal_group(signal.SIGTERM)
        alive = self._wait_gone(SHUTDOWN_TIMEOUT_S)
        if alive:
            self.killed = sorted(proc.pid for proc in alive)
            self._signal_group(signal.SIGKILL)
            for proc in alive:  # a child that left the group is still ours to clean up
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            alive = self._wait_gone(10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1)
        self._log.close()
        return sorted(proc.pid for proc in alive)

    def __enter__(self) -> RemoteOpenAIServer:
        try:
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _exited(proc: psutil.Process) -> bool:
    """Exited (a zombie waiting for its parent to reap it counts as exited)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---------------------------------------------------------------------------------------------- metrics
class MetricsSnapshot:
    """One scrape of /metrics, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def get(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; 0 when that labelled child does not exist yet."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def sum(self, name: str, **labels: str) -> float:
        """Sum over the samples of `name` whose labels include `labels` (vLLM adds model_name, engine)."""
        wanted = set(labels.items())
        return sum(v for (n, sample_labels), v in self.samples.items() if n == name and wanted <= set(sample_labels))


class Metrics:
    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def scrape(self) -> MetricsSnapshot:
        response = self.http.get("/metrics")
        assert response.status_code == 200, response.text
        return MetricsSnapshot(response.text)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteOpenAIServer]:
    root = tmp_path_factory.mktemp("ponder-server")
    remote = RemoteOpenAIServer(SERVER_ARGS, trace_dir=root / "traces", log_path=root / "server.log")
    try:
        remote.wait_until_ready()
        yield remote
    finally:
        leftover = remote.stop()
    assert not leftover, f"processes of the server's group survived SIGKILL: {leftover}\n{remote.log_tail()}"
    assert remote.proc.returncode is not None
    if remote.killed:
        warnings.warn(
            f"ponder serve needed SIGKILL after {SHUTDOWN_TIMEOUT_S:.0f} s: pids {remote.killed}", stacklevel=1
        )


@pytest.fixture(scope="session")
def client(server: RemoteOpenAIServer) -> Iterator[openai.OpenAI]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def http(server: RemoteOpenAIServer) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c


@pytest.fixture(scope="session")
def model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture
def trace_of(http: httpx.Client):
    """GET /v1/traces/{id}, asserting it exists."""

    def get(trace_id: str) -> dict[str, Any]:
        response = http.get(f"/v1/traces/{trace_id}")
        assert response.status_code == 200, response.text
        return response.json()

    return get


@pytest.fixture
def metrics(http: httpx.Client) -> Metrics:
    return Metrics(http)


# ---------------------------------------------------------------------------------------------- ordering
# Modules that start engines of their own (and stop them at their end) run before any test that uses the shared
# `server`, so only one engine runs at a time. The first two sort first by name anyway.
OWN_ENGINE_MODULES = ("test_adaptive_heads.py", "test_distill_round.py", "test_remote_upstream.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    positions = [k for k, item in enumerate(items) if item.path.parent == here]
    ours = [items[k] for k in positions]
    ordered = [i for i in ours if i.path.name in OWN_ENGINE_MODULES] + [
        i for i in ours if i.path.name not in OWN_ENGINE_MODULES
    ]
    for k, item in zip(positions, ordered):
        items[k] = item
