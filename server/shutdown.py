"""Graceful stop: SIGTERM drains, then uvicorn stops, then no child process of the server is left alive.

1. SIGTERM (or SIGINT): admission refuses new requests with 503 `shutting_down`, `/health` turns 503 (readiness),
   the listener stays open so a load balancer sees it; admitted and queued requests finish, up to
   `--drain-timeout`.
2. uvicorn stops: closes the listener and the idle connections; the lifespan closes the trace journal (its
   last batch written and fsynced) and shuts vLLM's engine down.
3. `reap_children`: whatever vLLM left (EngineCore, its workers) is terminated, then killed after a grace period.

A second signal during the drain stops at once (the journal still flushes; only a third skips that).
Send SIGTERM to the server process, not to its process group: vLLM's engine process ends on its own SIGTERM,
which would fail the requests being drained (with systemd: `KillMode=mixed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from types import FrameType

import uvicorn

logger = logging.getLogger(__name__)

CHILD_GRACE_S = 10.0  # EngineCore gets this long to exit on SIGTERM before SIGKILL


def freeze_startup_heap() -> None:
    """Put everything alive once the server has started (torch, transformers, vLLM, the tokenizer: ~600k
    objects) out of the garbage collector's reach, as vLLM's own server does. Otherwise every full collection
    walks them all: a pause of a few hundred milliseconds here, in the middle of whatever is streaming."""
    gc.collect()
    gc.freeze()


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.drain_timeout_s = drain_timeout_s
        self.drain_started = False
        self.drain_task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)  # the app's lifespan has started the engine
        freeze_startup_heap()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Runs in the main thread between bytecodes (uvicorn installs it with `signal.signal`)."""
        if not self.drain_started and self.loop is not None and not self.should_exit:
            self.drain_started = True
            logger.info("%s: draining for up to %.0f s", signal.Signals(sig).name, self.drain_timeout_s)
            self.loop.call_soon_threadsafe(self._start_drain)
            return
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True  # not super(): it re-raises the signal after shutdown, killing the reaping

    def _start_drain(self) -> None:
        self.drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        from server.app import drain

        service = getattr(self.config.app.state, "service", None) if hasattr(self.config.app, "state") else None
        try:
            if service is not None:
                finished = await drain(service, self.drain_timeout_s)
                logger.info("drain %s", "complete" if finished else "timed out; stopping anyway")
        finally:
            self.should_exit = True


def is_resource_tracker(process) -> bool:
    """multiprocessing's resource tracker ignores SIGTERM on purpose: it outlives its parent by a moment to
    unlink the shared memory the parent leaked, and exits when the parent's end of its pipe closes."""
    import psutil

    try:
        return any("multiprocessing.resource_tracker" in part for part in process.cmdline())
    except psutil.Error:
        return False


def reap_children(grace_s: float = CHILD_GRACE_S) -> list[int]:
    """Terminate every descendant of this process still alive (but the resource tracker, which exits after us
    and cleans up), SIGKILL those that outlive `grace_s`. Returns the pids that needed SIGKILL."""
    import psutil  # vLLM's own dependency

    children = [child for child in psutil.Process().children(recursive=True) if not is_resource_tracker(child)]
    if not children:
        return []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    killed = [child.pid for child in alive]
    if killed:
        logger.warning("killed engine processes that outlived shutdown: %s", killed)
    return killed
