"""Launching a task as its initiator, on a thread of its own.

``start_task`` checks everything it can in the caller's thread (a bad
configuration fails right there), then runs the rounds on a thread with its
own event loop and returns a ``TaskRun`` at once: what a notebook wants.
``run_task`` waits for the run to end: what a script wants. A thread of its
own works the same from a script and from a kernel that already runs an
event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import os
import shlex
import threading
import time
import traceback
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Coroutine

from ..background import BackgroundLoop
from ..errors import ConfigurationError
from ..log import log_sink
from ..strategies import Strategy, rebuild, resolve
from ..strategies.guarantees import guarantees, target_epsilon
from ..wire.link import Link
from ..wire.relay import DEFAULT_PORT, EmbeddedRelay, Relay, new_token
from .checkpoint import Checkpoint
from .policy import RoundPolicy
from .rounds import Aggregator, Participant, TaskResult
from .scheduler import Scheduler
from .simulation import Simulation
from .state import TaskSnapshot, TaskStatus, failure_text
from .task import TaskPackage

__all__ = ["TaskRun", "run_task", "start_embedded_relay", "start_task"]

log = logging.getLogger("fedmagic")


class TaskRun:
    """A task running in the background; its state can be read from any thread.

    Attributes:
        task_id: the id participants join with.
        url: the relay's URL.
        join_command: the exact line a data owner runs to join.
        events: ``(time, text)`` of everything that happened, oldest first.
        checkpoint: the folder the task saves its model and history to.
    """

    def __init__(self, task_id: str, url: str, token: str, max_rounds: int = 0) -> None:
        self.task_id = task_id
        #: The task's name: its checkpoint's folder, and where its examples read data.
        self.name = task_id
        self.url = url
        self.token = token
        self.max_rounds = max_rounds
        self.join_command = shlex.join(
            ["fedmagic", "join", url, "--task", task_id, "--token", token, "--node", "NAME"]
        )
        self.events: list[tuple[float, str]] = []
        self.checkpoint: Path | None = None
        #: What the scheduler was built with.
        self.hyperparameters: dict[str, Any] = {}
        #: Its strategy, described (``Strategy.describe()``, as its data owners consented to
        #: it): what the privacy guarantees shown are read from. None: FedAvg's defaults.
        self.strategy: dict[str, Any] | None = None
        self.started = time.time()
        self.ended: float | None = None
        self._resumed_rounds = 0
        self._stop_asked = False  # before the round loop exists
        self._aggregator: Aggregator | None = None
        #: A simulated task's simulation (``launch_task(simulate=...)``).
        self.simulation: Simulation | None = None
        self._background: BackgroundLoop | None = None  # the task's thread, once started
        self._ended = False  # done(): set just before the last event, so it shows the end
        self._finished = threading.Event()  # set after the last event: wait() sees them all
        self._result: TaskResult | None = None
        self._error: BaseException | None = None
        self._listeners: list[Callable[[str], None]] = []

    @property
    def participants(self) -> dict[str, Participant]:
        return dict(self._aggregator.participants) if self._aggregator else {}

    @property
    def history(self) -> list[dict[str, Any]]:
        if self.simulation is not None:
            return list(self.simulation.history)
        return list(self._aggregator.history) if self._aggregator else []

    @property
    def error(self) -> BaseException | None:
        """What ended the task, once it ended with an error."""
        return self._error

    @property
    def stop_requested(self) -> bool:
        return self._stop_asked

    def done(self) -> bool:
        return self._ended

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(text)`` on every event, on the task's thread, until it ends."""
        self._listeners.append(listener)

    def wait(self, timeout: float | None = None) -> TaskResult:
        """Block until the task ends and return its result.

        Raises:
            TimeoutError: if it is still running after ``timeout`` seconds.
            TaskFailed: (or the error that ended it) if it failed.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"task {self.task_id!r} is still running after {timeout:g} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None, "a task that ended without an error has a result"
        return self._result

    def stop(self, now: bool = False) -> None:
        """End the task after the current round, keeping its checkpoint.

        Args:
            now: cancel at once instead; participants are told the task stopped.
        """
        if self.done():
            return
        self._stop_asked = True
        if self.simulation is not None:
            # its rounds run on a worker thread, which no cancel reaches: it stops between rounds
            self.simulation.request_stop()
        elif now and self._background is not None:
            self._background.cancel()
        elif self._aggregator is not None and self._background is not None:
            self._background.call(self._aggregator.request_stop)

    def _record(self, text: str) -> None:
        self.events.append((time.time(), text))
        for listener in list(self._listeners):
            try:
                listener(text)
            except Exception:  # a broken display must not break the task
                log.exception("a listener of task %r failed", self.task_id)

    def _start(
        self,
        main: Callable[[], Coroutine[Any, Any, TaskResult]],
        embedded: EmbeddedRelay | None,
        quiet: bool,
    ) -> None:
        def finish(task: Future[TaskResult]) -> None:  # on the task's thread, its loop closed
            try:
                self._result = task.result()
            except BaseException as exc:
                self._error = exc
            finally:
                if embedded is not None:
                    embedded.stop()
                self.ended = time.time()
                self._ended = True
                try:
                    failure = self._failure()
                    self._record(
                        f"task {self.task_id!r} ended"
                        if failure is None
                        else f"task {self.task_id!r} {failure_text(failure)}"
                    )
                finally:
                    self._finished.set()

        context = contextvars.copy_context()
        if quiet:  # the task's log lines become its events, and stay out of stderr
            context.run(log_sink.set, self._record)
        self._background = BackgroundLoop(f"fedmagic-task-{self.task_id}")
        self._background.run(main(), context=context, then=finish)

    def snapshot(self) -> TaskSnapshot:
        """Where the task stands now: what every display of it renders."""
        done, error = self.done(), self._error
        status = (
            TaskStatus.RUNNING
            if not done
            else TaskStatus.FINISHED
            if error is None
            else TaskStatus.FAILED
        )
        return TaskSnapshot(
            self.task_id,
            status,
            self._failure(),
            "" if error is None else "".join(traceback.format_exception(error)),
            self.stop_requested and not done,
            self.max_rounds,
            self._aggregator.states() if self._aggregator is not None else (),
            tuple(self.history),
            self.join_command,
            dict(self.hyperparameters),
            self.started,
            self.ended,
            time.time(),
            None if self.checkpoint is None else str(self.checkpoint),
            self._resumed_rounds,
            tuple(guarantees(self.strategy)),
            target_epsilon(self.strategy),
            None if self.simulation is None else self.simulation.describe(),
        )

    def summary(self) -> str:
        """The task as text: its state, each participant, and each round's metrics."""
        return self.snapshot().summary()

    def _failure(self) -> str | None:
        """What ended the task, in words that follow its name (a ``TaskFailed`` names it)."""
        if self._error is None:
            return None
        return str(self._error).removeprefix(f"task {self.task_id!r} ")

    def __repr__(self) -> str:
        state = "finished" if self.done() else "running"
        return f"<TaskRun {self.task_id!r} {state}, {len(self.history)} rounds>"


def start_task(
    scheduler: Scheduler,
    task_id: str,
    *,
    relay: str | None = None,
    token: str | None = None,
    relay_token: str | None = None,
    dataset_verify: Any = None,
    join_timeout: float = 300.0,
    join_grace: float = 3.0,
    resume: bool | None = None,
    strategy: Strategy | str | None = None,
    max_samples: int = 10**9,
    upload_timeout: float | None = None,
    upload_memory: int = 256 << 20,
    federated_evaluation: bool = True,
    allowed_nodes: list[str] | None = None,
    reconnect_window: float = 60.0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    on_event: Callable[[str], None] | None = None,
    quiet: bool = False,
    simulate: int | dict[str, Any] | None = None,
    **unknown: Any,
) -> TaskRun:
    """Start a task as its initiator and return its ``TaskRun`` at once.

    Args:
        relay: the relay's URL; default ``$FEDMAGIC_RELAY``, else a relay
            embedded in this process on 127.0.0.1, port ``$FEDMAGIC_PORT``
            (default 8765).
        token: the join token participants must present; default
            ``$FEDMAGIC_TOKEN``, else a fresh random one (logged).
        relay_token: the relay operator's token; default ``$FEDMAGIC_RELAY_TOKEN``.
        dataset_verify: a ``DatasetVerify`` class or file to send with the task
            (in a notebook, the class a ``%%dataset_verify`` cell registered for it).
        strategy: how a round's updates combine: a strategy from
            :mod:`fedmagic.strategies` (``FedAdam(eta=1e-2)``), or its short
            name (``"fedprox"``); default FedAvg. Its parameters are part of
            the code hash, so data owners consent to them.
        join_timeout, join_grace, max_samples, upload_timeout, upload_memory,
            federated_evaluation: how rounds run; see
            :class:`fedmagic.engine.policy.RoundPolicy`.
        allowed_nodes: the only node names that may join (None: anyone with
            the join token), so a token holder cannot take another's name.
        reconnect_window: seconds to keep trying to get the relay back when
            its connection drops (a relay restart, say); the round it was in
            then runs again with the participants that come back, and none
            of them is asked to consent again. 0 fails the task at once.
        resume: continue from the checkpoint in ``models/<name>/``; by default,
            when it holds an unfinished run of this same code (so an author
            restarting a task changes nothing data owners consented to).
        checkpoint_dir: default ``models/<name>``.
        on_event: called (on the task's thread) with each event line.
        quiet: keep the task's log lines out of stderr; they are still in
            ``TaskRun.events`` (a notebook's background task shows them in its
            widget instead of in whichever cell runs at the time).
        simulate: try the task with this many virtual participants instead of
            real ones, or a dict of :class:`~fedmagic.engine.simulation.Simulation`'s
            options (``{"participants": 1000, "partition": "dirichlet", "alpha": 0.3}``);
            no relay, no data owners: the scheduler's own training set is shared out.
            Relay, join and upload options do not apply then.

    Raises:
        ConfigurationError, TaskDefinitionError, UnsupportedTensor: for a
            task that cannot start; nothing is left running then.
    """
    if not isinstance(task_id, str) or not task_id.strip():
        raise ConfigurationError(
            "task_id",
            task_id,
            "pass the id participants will join, e.g. launch_task(task_id='digits')",
        )
    _refuse_unknown(unknown)
    if simulate is not None:
        return _start_simulation(scheduler, task_id, simulate, strategy, on_event, quiet)
    chosen = resolve(strategy)
    policy = RoundPolicy(
        join_timeout=join_timeout,
        join_grace=join_grace,
        max_samples=max_samples,
        upload_timeout=upload_timeout,
        upload_memory=upload_memory,
        federated_evaluation=federated_evaluation,
    )
    chosen.check(scheduler.min_clients, scheduler.max_clients)
    if not scheduler.is_centralized:
        rebuild(chosen.describe())  # what an elected aggregator will do, or why it cannot
    if allowed_nodes is not None and (
        isinstance(allowed_nodes, str)
        or not all(isinstance(node, str) and node for node in allowed_nodes)
    ):
        raise ConfigurationError(
            "allowed_nodes",
            allowed_nodes,
            "must be a list of node names, e.g. ['hospital-a', 'hospital-b'], or None",
        )
    if (
        isinstance(reconnect_window, bool)
        or not isinstance(reconnect_window, (int, float))
        or not 0 <= reconnect_window < float("inf")
    ):
        raise ConfigurationError(
            "reconnect_window",
            reconnect_window,
            "must be a number of seconds, 0 or more (0: fail the task when the relay is lost)",
        )
    scheduler._check_rounds()
    scheduler._setup(task_id)
    name = scheduler.name
    assert name is not None, "_setup() names the task"
    state_bytes = sum(t.numel() * t.element_size() for t in scheduler.state_dict().values())
    policy.check_memory(chosen, scheduler.min_clients, state_bytes)
    package = TaskPackage.from_scheduler(scheduler, task_id, dataset_verify, chosen.describe())
    checkpoint = Checkpoint(Path(checkpoint_dir or Path("models") / name).absolute())
    history: list[dict[str, Any]] = []
    announce = [
        f"task {task_id!r}: code hash {package.code_hash[:16]}, strategy {package.strategy_text}"
    ]
    if resume is None:
        resume = checkpoint.holds_unfinished_run_of(package.code_hash)
        if resume:
            announce.append(
                f"continuing the unfinished run of this same code saved in "
                f"{checkpoint.directory} (resume=False starts over)"
            )
    if resume and checkpoint.exists():
        state, done, history = checkpoint.load()
        scheduler.load_state_dict(state)
        scheduler.current_round = done
        log.info("resuming task %r after round %d from %s", task_id, done, checkpoint.directory)
        if checkpoint.restore_strategy(chosen):
            log.info("%s continues from what it had learned by round %d", chosen, done)
    token = token or os.environ.get("FEDMAGIC_TOKEN") or new_token()
    relay_token = relay_token or os.environ.get("FEDMAGIC_RELAY_TOKEN")
    url = relay or os.environ.get("FEDMAGIC_RELAY")
    embedded = None
    if not url and not scheduler.is_task_finished():
        embedded = start_embedded_relay()
        url = embedded.url
    run = TaskRun(task_id, url or "", token, scheduler.max_rounds)
    run.name = name
    run.checkpoint = checkpoint.directory
    run.hyperparameters = scheduler.hyperparameters()
    run.strategy = package.strategy
    run._resumed_rounds = len(history)

    def record(text: str) -> None:
        run._record(text)
        if on_event is not None:
            on_event(text)

    async def main() -> TaskResult:
        if scheduler.is_task_finished():
            record(f"the checkpoint of task {task_id!r} is already finished; nothing to run")
            return TaskResult(task_id, name, scheduler.current_round, history, checkpoint.directory)
        assert url, "a task with rounds to run has a relay, embedded if none was given"
        link = await Link.open(
            url,
            role="initiator",
            task=task_id,
            token=token,
            relay_token=relay_token,
            allowed_nodes=None if allowed_nodes is None else list(allowed_nodes),
        )
        run._aggregator = Aggregator(
            scheduler,
            package,
            link,
            checkpoint=checkpoint,
            policy=policy,
            strategy=chosen,
            history=history,
            on_event=record,
            reconnect_window=reconnect_window,
        )
        if run.stop_requested:  # asked while the relay connection opened
            run._aggregator.request_stop()
        return await run._aggregator.run()

    if url:
        announce.append(f"participants join with:  {run.join_command}")
    for line in announce:  # the widget's log starts with them; stderr only outside one
        run._record(line)
        if not quiet:
            log.info("%s", line)
    run._start(main, embedded, quiet)
    return run


def _start_simulation(
    scheduler: Scheduler,
    task_id: str,
    simulate: int | dict[str, Any],
    strategy: Strategy | str | None,
    on_event: Callable[[str], None] | None,
    quiet: bool,
) -> TaskRun:
    """``start_task(simulate=...)``: the task's rounds with virtual participants, on a thread."""
    options = {"participants": simulate} if not isinstance(simulate, dict) else dict(simulate)
    count = options.get("participants")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigurationError(
            "simulate",
            simulate,
            "pass how many virtual participants, e.g. simulate=1000, or a dict of "
            "Simulation's options with 'participants' in it",
        )
    scheduler._check_rounds()
    run = TaskRun(task_id, "", "", scheduler.max_rounds)
    run.join_command = ""
    run.hyperparameters = scheduler.hyperparameters()

    def record(text: str) -> None:
        run._record(text)
        if on_event is not None:
            on_event(text)

    try:
        run.simulation = Simulation(
            scheduler,
            options.pop("participants"),
            task_id=task_id,
            strategy=strategy,
            on_event=record,
            **options,
        )
    except TypeError as unknown:
        raise ConfigurationError("simulate", simulate, f"{unknown}") from None
    run.strategy = run.simulation.strategy.describe()
    simulation = run.simulation

    async def main() -> TaskResult:
        result = await asyncio.to_thread(simulation.run)
        run.name, run.checkpoint = result.name, result.checkpoint
        return result

    run._start(main, None, quiet)
    return run


#: Options that became strategies, and how to say them now.
_BECAME_STRATEGIES = {
    "aggregation": "strategy=FedMedian() or strategy=FedTrimmedAvg(beta=...) "
    "(aggregation='mean' is the default, FedAvg())",
    "trim": "strategy=FedTrimmedAvg(beta=...)",
    "weighted": "strategy=FedAvg(weighted=False)",
    "max_weight_share": "strategy=FedAvg(max_weight_share=...)",
}


def _refuse_unknown(options: dict[str, Any]) -> None:
    """Refuse options launch_task does not take, saying the new spelling of old ones.

    Raises:
        ConfigurationError: for an option that became a strategy.
        TypeError: for any other unknown option.
    """
    for name, value in options.items():
        if name in _BECAME_STRATEGIES:
            raise ConfigurationError(
                name,
                value,
                f"how updates combine is now the task's strategy: pass "
                f"{_BECAME_STRATEGIES[name]}, from fedmagic.strategies",
            )
        raise TypeError(f"launch_task() got an unexpected keyword argument {name!r}")


def run_task(scheduler: Scheduler, task_id: str, **options: Any) -> TaskResult:
    """Run a task as its initiator until it ends; Ctrl-C stops it and tells everyone.

    Takes the options of :func:`start_task`.

    Raises:
        TaskFailed: if the task could not finish.
    """
    run = start_task(scheduler, task_id, **options)
    try:
        while not run.done():
            run._finished.wait(0.2)
    except KeyboardInterrupt:
        run.stop(now=True)
        run._finished.wait()
        rounds = len(run.history)
        log.warning(
            "task %r interrupted (Ctrl-C); every participant was told%s",
            task_id,
            f". The model after round {rounds} is in {run.checkpoint}; run the same "
            "code again to continue from there"
            if rounds
            else "",
        )
        raise
    return run.wait()


def start_embedded_relay(port: int | None = None) -> EmbeddedRelay:
    """A relay in this process on 127.0.0.1, on ``port`` (default ``$FEDMAGIC_PORT``, else 8765).

    When the port is taken (another notebook's relay, say), it listens on a
    free port instead and says which: the join line carries the real URL.
    """
    if port is None:
        port = int(os.environ.get("FEDMAGIC_PORT", DEFAULT_PORT))
    # The task's own log tells who joined and left; the relay's would say it twice.
    logging.getLogger("fedmagic.relay").setLevel(logging.WARNING)
    try:
        return EmbeddedRelay("127.0.0.1", port, Relay()).start()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise ConfigurationError(
                "FEDMAGIC_PORT",
                port,
                f"cannot start the embedded relay ({exc.strerror or exc}): set FEDMAGIC_PORT "
                "to another port, or FEDMAGIC_RELAY to a running relay's URL",
            ) from None
    relay = EmbeddedRelay("127.0.0.1", 0, Relay()).start()
    log.warning(
        "port %d is taken (another notebook's relay?), so the relay embedded here listens "
        "on %s instead",
        port,
        relay.url,
    )
    return relay
