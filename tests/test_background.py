"""The one background event loop: a thread of its own, driven from others."""

from __future__ import annotations

import asyncio
import threading

import pytest

from fedmagic.background import BackgroundLoop


def test_run_gives_the_coroutines_result_and_then_runs_last_on_the_loops_thread():
    seen: list[str] = []

    async def work() -> int:
        seen.append(threading.current_thread().name)
        return 42

    done = threading.Event()
    future = BackgroundLoop("fedmagic-test").run(
        work(), then=lambda f: (seen.append(f"then {f.result()}"), done.set()))

    assert future.result(timeout=10) == 42
    assert done.wait(10)
    assert seen == ["fedmagic-test", "then 42"]


def test_cancel_ends_a_running_coroutine_and_its_future_says_so():
    loop = BackgroundLoop("fedmagic-test").start()
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    future = loop.submit(forever())
    assert started.wait(10)
    loop.cancel()

    with pytest.raises(asyncio.CancelledError):
        future.result(timeout=10)
    loop.stop(timeout=10)


def test_a_stopped_loop_refuses_more_work_clearly():
    loop = BackgroundLoop("fedmagic-test").start()
    loop.stop(timeout=10)

    async def late() -> None: ...

    with pytest.raises(RuntimeError, match="the background loop 'fedmagic-test' is not running"):
        loop.submit(late()).result(timeout=10)
    assert loop.call(print) is False
