"""Running the simulator: in a background thread (tests, benchmarks) or in the foreground (CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from batcher.simulator.app import STATS_KEY, make_app
from batcher.simulator.config import SimConfig
from batcher.simulator.stats import Stats

SHUTDOWN_TIMEOUT_S = 0.5
"""How long a stopping server waits for answers in progress before cancelling them."""


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop]:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    # handler_cancellation: a client that gives up cancels its handler (ends a hang);
    # no access log: it is slow and would print ?key= query strings.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


class SimulatorThread:
    """The simulator on ``host`` (default 127.0.0.1) and an ephemeral port, in a daemon
    thread with its own event loop (uvloop when importable and ``use_uvloop``).

    ``with SimulatorThread(SimConfig()) as sim:`` starts it and waits until it listens;
    ``sim.base_url`` is ``http://127.0.0.1:PORT/v1`` (Gemini: ``sim.gemini_base_url``) and
    ``sim.stats`` the live :class:`Stats`. Leaving the block stops the server — hung and
    slow requests included — and joins the thread, within a few seconds.
    """

    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1",
                 port: int = 0, *, use_uvloop: bool = True) -> None:
        self.config = config if config is not None else SimConfig()
        self.host = host
        self.port = port
        self.app = make_app(self.config)
        self._use_uvloop = use_uvloop
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def stats(self) -> Stats:
        return self.app[STATS_KEY]

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI/Anthropic base URL, version path included."""
        return f"{self.root_url}/v1"

    @property
    def gemini_base_url(self) -> str:
        return f"{self.root_url}/v1beta"

    def start(self) -> SimulatorThread:
        """Start serving; returns once the socket listens. Raises what binding raised."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        self._thread = threading.Thread(target=self._run, name="batcher-simulator",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and join the thread (at most ``timeout`` seconds)."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        loop = _loop_factory(self._use_uvloop)()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner, self.port = await _start(self.app, self.host, self.port)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGINT/SIGTERM (blocking; the ``batcher simulate`` command).

    Uses uvloop when importable. Once listening, prints exactly one line to stderr:
    ``batcher simulate: listening on http://HOST:PORT/v1`` (the real port when ``port=0``).
    Raises OSError when the address cannot be bound.
    """
    with asyncio.Runner(loop_factory=_loop_factory(True)) as runner:
        runner.run(_serve_forever(config, host, port))


async def _serve_forever(config: SimConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or a platform without signal handlers
    runner, bound = await _start(make_app(config), host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"batcher simulate: listening on http://{shown}:{bound}/v1", file=sys.stderr,
          flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        for sig in installed:
            loop.remove_signal_handler(sig)
