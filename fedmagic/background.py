"""An asyncio event loop on a thread of its own, driven from other threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import threading
from typing import Any, Callable, Coroutine, TypeVar

__all__ = ["BackgroundLoop"]

T = TypeVar("T")


class BackgroundLoop:
    """An event loop on a daemon thread named ``name``; any thread may drive it.

    Which thread runs what:

    - The loop's thread (``name``) runs the event loop, and with it every
      coroutine given to :meth:`submit` or :meth:`run` and every function
      given to :meth:`call`. Once the loop stops, that same thread closes it
      cleanly (it cancels the tasks still pending and waits for them, then
      ``shutdown_asyncgens`` and ``shutdown_default_executor``), calls the
      ``then`` given to :meth:`run`, and ends.
    - Any other thread may call :meth:`start`, :meth:`run`, :meth:`submit`,
      :meth:`call`, :meth:`cancel` and :meth:`stop`: they reach the loop only
      through ``call_soon_threadsafe``. A loop runs once: ``start`` and ``run``
      raise ``RuntimeError`` the second time; once it is closed, ``call``
      returns False, ``submit`` a failed future, ``cancel`` and ``stop`` nothing.
    - The ``concurrent.futures.Future`` that :meth:`submit` and :meth:`run`
      return is settled on the loop's thread, so its done callbacks run there;
      it cannot be cancelled itself: :meth:`cancel` cancels the coroutine,
      which may still clean up, and the future then holds what it returned or
      raised (``asyncio.CancelledError`` if it let the cancellation end it).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.RLock()  # calls into the loop against its closing
        self._closing = False  # on the loop's thread: it stopped, and closes
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()  # on the loop's thread only
        self._unsettled: set[concurrent.futures.Future[Any]] = set()  # not yet settled
        self._then: Callable[[], object] | None = None

    def start(self) -> BackgroundLoop:
        """Start the thread; its loop runs until :meth:`stop`."""
        self._open()
        self._thread.start()
        return self

    def run(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        context: contextvars.Context | None = None,
        then: Callable[[concurrent.futures.Future[T]], object] | None = None,
    ) -> concurrent.futures.Future[T]:
        """Start the thread with ``coro`` as its main coroutine: ``asyncio.run`` there.

        The loop stops once ``coro`` ends; its thread then closes the loop and,
        as its last act, calls ``then(future)``.
        """
        self._open()
        future = self.submit(coro, context=context, last=True)
        if then is not None:
            self._then = functools.partial(then, future)
        self._thread.start()
        return future

    def submit(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        context: contextvars.Context | None = None,
        last: bool = False,
    ) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the loop, in ``context`` (default: a copy of the caller's).

        Args:
            last: stop the loop once ``coro`` ends.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # cancelled through cancel() only

        def settle(task: asyncio.Task[T]) -> None:
            self._tasks.discard(task)
            with self._lock:
                self._unsettled.discard(future)
            try:
                future.set_result(task.result())
            except BaseException as exc:  # CancelledError too: what ended it
                future.set_exception(exc)
            if last and not self._closing:
                task.get_loop().stop()

        def create() -> None:
            task = asyncio.get_running_loop().create_task(coro, context=context)
            self._tasks.add(task)
            task.add_done_callback(settle)

        with self._lock:
            if self.call(create):
                self._unsettled.add(future)
                return future
        coro.close()
        future.set_exception(RuntimeError(f"the background loop {self.name!r} is not running"))
        return future

    def call(self, function: Callable[..., object], *args: Any) -> bool:
        """Call ``function(*args)`` on the loop's thread soon; False if there is no loop."""
        with self._lock:
            if self._loop is None or self._closed:
                return False
            self._loop.call_soon_threadsafe(function, *args)
            return True

    def cancel(self) -> None:
        """Cancel every coroutine submitted that has not ended."""
        self.call(lambda: [task.cancel() for task in list(self._tasks)])

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop; wait up to ``timeout`` s for its thread, unless called on it."""
        if self._loop is not None:
            self.call(self._loop.stop)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _open(self) -> None:
        with self._lock:
            if self._loop is not None:
                raise RuntimeError(f"the background loop {self.name!r} was started already")
            self._loop = asyncio.new_event_loop()

    def _main(self) -> None:
        loop = self._loop
        assert loop is not None, "_open() makes the loop before the thread starts"
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        except (KeyboardInterrupt, SystemExit):
            pass  # from a coroutine, its future gets it as the loop closes; a callback's ends
        finally:
            self._closing = True
            try:
                _cancel_pending(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                with self._lock:
                    self._closed = True
                    loop.close()
                    unsettled, self._unsettled = self._unsettled, set()
                asyncio.set_event_loop(None)
                for future in unsettled:  # submitted as the loop closed: they never ran
                    future.set_exception(RuntimeError(f"the background loop {self.name!r} closed"))
                if self._then is not None:
                    self._then()


def _cancel_pending(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the loop's tasks still pending and wait for them, as ``asyncio.run`` does."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "an unfinished task raised as its loop closed",
                    "exception": task.exception(),
                    "task": task,
                }
            )
