"""SIGTERM end to end without a model: a real uvicorn `DrainingServer` in a child process over the scripted
engine. Readiness turns 503, the request in flight finishes, the journal is sealed, the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx

from server.trace_journal import read_records

REPO = Path(__file__).resolve().parents[2]
SERVER_SCRIPT = """
import logging, sys, uvicorn
from pathlib import Path
from server.app import create_app
from server.settings import ServerSettings
from server.shutdown import DrainingServer
from tests.fakes import CharRenderer, ScriptedEngine

logging.basicConfig(level=logging.INFO)
port, trace_dir = int(sys.argv[1]), Path(sys.argv[2])
settings = ServerSettings(model_path="unused", served_model_name="toy", trace_dir=trace_dir, drain_timeout_s=20)
engine = ScriptedEngine(["The answer is 42."], delay_s=2.0)
app = create_app(settings, lambda: engine, CharRenderer)
DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info"), drain_timeout_s=20).run()
print("exited cleanly", flush=True)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False


def test_sigterm_drains_the_request_in_flight_then_exits(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SERVER_SCRIPT), str(port), str(tmp_path / "traces")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: httpx.get(f"{base}/health").status_code == 200, 30)
        answers: list[httpx.Response] = []
        body = {"model": "toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
        sender = threading.Thread(
            target=lambda: answers.append(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30))
        )
        sender.start()
        time.sleep(0.5)  # the request is in the engine (2 s)
        proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: httpx.get(f"{base}/health").status_code == 503, 5)
        refused = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        sender.join(timeout=30)
        assert answers and answers[0].status_code == 200, answers
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "drain complete" in output and "exited cleanly" in output
    records = list(read_records(tmp_path / "traces"))
    assert [r["status"] for r in records] == ["ok"]  # the drained request, written before exit
    assert not list((tmp_path / "traces").glob("*.active.jsonl"))  # sealed on the way out


def run_isolated(code: str) -> dict:
    """Run `code` in a fresh interpreter and return the JSON it prints last. reap_children ends every child of
    the process that calls it: called in pytest's own process it would also end servers the same session owns
    (the integration suite's shared server, when `pytest tests` runs both suites)."""
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_reap_children_terminates_what_is_left():
    outcome = run_isolated(
        """
import json, signal, subprocess, sys, time
from server.shutdown import reap_children
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
stubborn = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"]
)
time.sleep(0.3)  # let the second one install its handler
killed = reap_children(grace_s=1)
child.wait(timeout=5)  # both gone (psutil reaped them, so Popen sees no status of its own)
stubborn.wait(timeout=5)
print(json.dumps({"killed": killed, "stubborn": stubborn.pid}))
"""
    )
    assert outcome["killed"] == [outcome["stubborn"]]


def test_reap_children_leaves_the_resource_tracker_to_exit_by_itself():
    outcome = run_isolated(
        """
import json, os
from multiprocessing import resource_tracker
from server.shutdown import reap_children
resource_tracker.ensure_running()  # a child that ignores SIGTERM and exits when we do
tracker_pid = resource_tracker._resource_tracker._pid
killed = reap_children(grace_s=1)
os.kill(tracker_pid, 0)  # still alive: it exits once this process's end of its pipe closes
print(json.dumps({"killed": killed}))
"""
    )
    assert outcome["killed"] == []


def test_the_startup_heap_is_frozen_out_of_the_collectors_reach():
    import gc

    from server.shutdown import freeze_startup_heap

    alive = [object() for _ in range(10)]
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(alive)
    finally:
        gc.unfreeze()  # this test process goes on collecting as before
