"""A task as it travels: source code and constructor arguments, never a pickle.

The initiator packs the source that defines its scheduler class (the script,
or the notebook cell) with the arguments the scheduler was built with.
Each participant shows the package's hash to its data owner, runs the
source with launching disabled, and builds the same scheduler from the same
arguments.
"""

from __future__ import annotations

import hashlib
import inspect
import linecache
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import msgpack

from ..errors import ConfigurationError, ProtocolError, TaskDefinitionError
from ..strategies import FedAvg
from ..strategies.base import described_text
from ..strategies.guarantees import guarantees
from ..wire.codec import PROTOCOL_VERSION, Kind
from .context import CodeContext, current_context, running_code
from .scheduler import Scheduler

__all__ = ["TaskPackage"]

log = logging.getLogger("fedmagic")

#: The name ``__name__`` has while a participant runs a task's source.
TASK_MODULE = "__fedmagic_task__"


def _received(source: str, filename: str) -> CodeContext:
    """Code a participant received: its ``launch_task`` call launches nothing."""
    return CodeContext(source, filename, launch=_launch_nothing)


def _launch_nothing(scheduler: Scheduler, task_id: str, options: dict[str, Any]) -> None:
    log.debug("launch_task(%r) skipped: this node is a participant", task_id)


@dataclass(frozen=True)
class TaskPackage:
    """Everything a participant needs to rebuild the initiator's scheduler."""

    task_id: str
    class_name: str
    source: str
    filename: str
    args: list[Any]
    kwargs: dict[str, Any]
    verify_source: str | None = None
    #: The strategy's name and parameters (``Strategy.describe()``); None: FedAvg's defaults.
    strategy: dict[str, Any] | None = None

    @classmethod
    def from_scheduler(
        cls,
        scheduler: Scheduler,
        task_id: str,
        dataset_verify: Any = None,
        strategy: dict[str, Any] | None = None,
    ) -> TaskPackage:
        """Pack a scheduler built by the author's code.

        Args:
            dataset_verify: a ``DatasetVerify`` class, or the path of a file
                defining one. By default, a ``DatasetVerify`` defined next
                to the scheduler is used.
            strategy: the task's strategy, described: part of what data
                owners consent to.

        Raises:
            TaskDefinitionError: if the scheduler's source cannot be found.
            ConfigurationError: for a constructor argument that cannot travel.
        """
        scheduler_cls = type(scheduler)
        source, filename = _source_of(scheduler_cls)
        args, kwargs = scheduler._init_call
        _check_arguments_travel(scheduler_cls, args, kwargs)
        # Participants see the file's name, not where it sits on the author's machine.
        return cls(
            task_id=task_id,
            class_name=scheduler_cls.__qualname__,
            source=source,
            filename=os.path.basename(filename),
            args=list(args),
            kwargs=dict(kwargs),
            verify_source=_verify_source(dataset_verify),
            strategy=strategy,
        )

    @property
    def code_hash(self) -> str:
        """What a data owner consents to: the code and arguments, hashed."""
        material = msgpack.packb(
            [
                PROTOCOL_VERSION,
                self.class_name,
                self.source,
                self.verify_source or "",
                self.args,
                self.kwargs,
                self.strategy or {},
            ]
        )
        return hashlib.sha256(material).hexdigest()

    @property
    def call(self) -> str:
        """The constructor call participants repeat, e.g. ``Digits(2, 3, max_rounds=5)``."""
        arguments = [repr(value) for value in self.args]
        arguments += [f"{key}={value!r}" for key, value in self.kwargs.items()]
        return f"{self.class_name}({', '.join(arguments)})"

    @property
    def strategy_text(self) -> str:
        """The strategy as its data owner reads it, e.g. ``FedProx(mu=0.01, weighted=True)``."""
        return described_text(self.strategy or FedAvg().describe())

    @property
    def guarantees(self) -> list[str]:
        """What the strategy promises data owners about privacy, a line each; [] for none."""
        return guarantees(self.strategy)

    def review(self) -> str:
        """Everything the code hash covers, as its data owner reads it before consenting."""
        parts = [
            f"# task {self.task_id!r}, code hash {self.code_hash}",
            f"# runs: {self.call}",
            f"# strategy: {self.strategy_text}",
            *(f"# privacy: {line}" for line in self.guarantees),
            f"# ---- {self.filename} ----",
            self.source.rstrip(),
        ]
        if self.verify_source is not None:
            parts += [
                "# ---- DatasetVerify (its own code, run on your data first) ----",
                self.verify_source.rstrip(),
            ]
        return "\n".join(parts) + "\n"

    def to_header(self) -> dict[str, Any]:
        return {
            "t": Kind.TASK,
            "task": self.task_id,
            "class_name": self.class_name,
            "source": self.source,
            "filename": self.filename,
            "args": self.args,
            "kwargs": self.kwargs,
            "verify_source": self.verify_source,
            "strategy": self.strategy,
            "hash": self.code_hash,
        }

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> TaskPackage:
        """Read a ``task`` frame's header.

        Raises:
            ProtocolError: if a field is missing, mistyped, or the hash does
                not match the contents.
        """
        expected = {
            "task": str,
            "class_name": str,
            "source": str,
            "filename": str,
            "args": list,
            "kwargs": dict,
        }
        for key, kind in expected.items():
            if not isinstance(header.get(key), kind):
                raise ProtocolError("initiator", f"task frame has no valid {key!r}")
        verify = header.get("verify_source")
        if verify is not None and not isinstance(verify, str):
            raise ProtocolError("initiator", "task frame has an invalid 'verify_source'")
        strategy = header.get("strategy")
        if strategy is not None and not (
            isinstance(strategy, dict) and isinstance(strategy.get("name"), str)
        ):
            raise ProtocolError("initiator", "task frame has an invalid 'strategy'")
        package = cls(
            task_id=header["task"],
            class_name=header["class_name"],
            source=header["source"],
            filename=header["filename"],
            args=header["args"],
            kwargs=header["kwargs"],
            verify_source=verify,
            strategy=strategy,
        )
        if header.get("hash") != package.code_hash:
            raise ProtocolError("initiator", "the task's code hash does not match its code")
        return package

    def build_scheduler(self) -> Scheduler:
        """Run the source, launching nothing, and build the scheduler."""
        label = self._label(self.filename)
        namespace = _run_source(self.source, label)
        scheduler_cls = namespace.get(self.class_name)
        if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, Scheduler)):
            raise TaskDefinitionError(
                self.class_name,
                "is not defined by the task's source",
                "define the FedAvgScheduler subclass at the top level",
            )
        with running_code(_received(self.source, label)):
            return scheduler_cls(*self.args, **self.kwargs)

    def build_verifier(self, node: str) -> Any | None:
        """The task's ``DatasetVerify(task_id, node)``, or None if it has none."""
        if self.verify_source is not None:
            namespace = _run_source(self.verify_source, self._label("dataset_verify"))
        else:
            namespace = _run_source(self.source, self._label(self.filename))
        verify_cls = namespace.get("DatasetVerify")
        if verify_cls is None:
            if self.verify_source is not None:
                raise TaskDefinitionError(
                    "DatasetVerify",
                    "is not defined by the verification code",
                    "name the class DatasetVerify",
                )
            return None
        return verify_cls(self.task_id, node)

    def _label(self, filename: str) -> str:
        return f"<fedmagic task {self.task_id}: {os.path.basename(filename)}>"


def _run_source(source: str, filename: str) -> dict[str, Any]:
    lines = source.splitlines(keepends=True)
    linecache.cache[filename] = (len(source), None, lines, filename)
    namespace: dict[str, Any] = {"__name__": TASK_MODULE, "__file__": filename}
    with running_code(_received(source, filename)):
        exec(compile(source, filename, "exec"), namespace)
    return namespace


def _source_of(scheduler_cls: type) -> tuple[str, str]:
    source = getattr(scheduler_cls, "__fedmagic_source__", None)
    if isinstance(source, str):
        return source, getattr(scheduler_cls, "__fedmagic_filename__", "cell")
    context = current_context()
    if (
        context is not None
        and context.source is not None
        and scheduler_cls.__module__ == "__main__"
    ):
        if not re.search(rf"^\s*class\s+{scheduler_cls.__name__}\b", context.source, re.M):
            raise TaskDefinitionError(
                scheduler_cls.__name__,
                "is defined outside this %%fedavg_task cell",
                "define the class in the cell: the cell is the code participants receive",
            )
        return context.source, context.filename
    module = sys.modules.get(scheduler_cls.__module__)
    try:
        if module is None:
            raise TypeError(f"module {scheduler_cls.__module__!r} is not loaded")
        return inspect.getsource(module), getattr(module, "__file__", None) or "task.py"
    except (OSError, TypeError):
        raise TaskDefinitionError(
            scheduler_cls.__name__,
            "has no source file fedmagic can send to participants",
            "define it in a script run with python, or in a %%fedavg_task cell",
        ) from None


def _verify_source(dataset_verify: Any) -> str | None:
    if dataset_verify is None:
        return None
    if isinstance(dataset_verify, (str, os.PathLike)):
        with open(dataset_verify, encoding="utf-8") as file:
            return file.read()
    if isinstance(dataset_verify, type):
        return _source_of(dataset_verify)[0]
    raise ConfigurationError(
        "dataset_verify", dataset_verify, "pass the DatasetVerify class or the path of its file"
    )


def _check_arguments_travel(
    scheduler_cls: type[Scheduler], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    try:
        bound = inspect.signature(scheduler_cls.__init__).bind(None, *args, **kwargs)
        named = list(bound.arguments.items())[1:]
    except TypeError:
        named = [(f"argument {i + 1}", value) for i, value in enumerate(args)]
        named += list(kwargs.items())
    for name, value in named:
        try:
            packed = msgpack.packb(value)
            msgpack.unpackb(packed, strict_map_key=True)
        except (TypeError, ValueError, OverflowError):
            raise ConfigurationError(
                name,
                value,
                "cannot travel to participants: constructor arguments must be "
                "None, bool, int, float, str, bytes, or lists and str-keyed dicts of them; "
                "build other objects inside __init__ or make_model()",
            ) from None
