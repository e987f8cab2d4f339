"""What a task defines, as the engine runs it: ``FedAvgScheduler`` without ``launch_task``.

The names and meanings follow the reference tutorial, so a scheduler written
for it runs here unchanged: the author supplies the model, the data loaders,
``train``, ``test`` and the state to average; fedmagic runs the rounds.
Authors subclass :class:`fedmagic.fed_avg.FedAvgScheduler`, which adds the
one method that starts the engine; everything the engine asks of a task is
here, so no part of the engine imports what starts it.
"""

from __future__ import annotations

import abc
import inspect
import logging
import numbers
from typing import Any, Dict

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import ConfigurationError, TaskDefinitionError
from ..strategies import proximal_term
from ..strategies.aggregate import check_state
from .checkpoint import check_folder_name

__all__ = ["Scheduler", "test_metrics"]

log = logging.getLogger("fedmagic")

_REQUIRED = (
    "make_model",
    "make_train_dataloader",
    "make_test_dataloader",
    "state_dict",
    "load_state_dict",
    "train",
    "test",
)


class Scheduler(abc.ABC):
    """A federated-averaging task: what it trains, on what, and for how many rounds.

    Args:
        min_clients: the fewest participants a round needs; fewer fails the task.
        max_clients: the most participants a round uses; extra ones wait.
        name: the task's name (checkpoints go to ``models/<name>/``);
            defaults to the task id.
        max_rounds: the task ends after this many rounds (unless
            ``is_task_finished`` is overridden).
        merge_epochs: local epochs (calls of ``train()``) between averagings.
        calculation_timeout: seconds a participant has to train and report
            before it is left out of the round.
        log_rounds: run ``test()`` every this many rounds (always after
            round 1 and the last round).
        is_centralized: True: the initiator aggregates each round's updates.
            False: each round a participant of the round is elected to
            aggregate them (in turn, by name), so the initiator sees only
            their combination; it still coordinates, tests and checkpoints.
    """

    # Set in ``__init__`` (and ``_init_call`` in ``__new__``); declared here so
    # subclasses and the engine see their types. Annotations only: no class
    # attributes, so ``_setup`` can still tell a skipped ``__init__``.
    _init_call: tuple[tuple[Any, ...], dict[str, Any]]
    min_clients: int
    max_clients: int
    name: str | None
    max_rounds: int
    merge_epochs: int
    calculation_timeout: float
    log_rounds: int
    is_centralized: bool
    task_id: str | None
    current_round: int
    model: nn.Module | None
    #: What the task's strategy told this node for the current round (on a participant).
    round_config: dict[str, Any]
    #: The global state this round started from, as received (on a participant).
    global_state: Dict[str, torch.Tensor] | None
    _context_validated: bool

    def __new__(cls, *args: Any, **kwargs: Any) -> Scheduler:
        missing = [name for name in _REQUIRED if name in getattr(cls, "__abstractmethods__", ())]
        if missing:
            raise TaskDefinitionError(
                cls.__name__,
                f"does not define {', '.join(name + '()' for name in missing)}",
                "a FedAvgScheduler implements " + ", ".join(_REQUIRED),
            )
        scheduler = super().__new__(cls)
        # What participants rebuild the scheduler from: the author's own call.
        scheduler._init_call = (args, kwargs)
        return scheduler

    def __init__(
        self,
        min_clients: int,
        max_clients: int,
        name: str | None = None,
        max_rounds: int = 0,
        merge_epochs: int = 1,
        calculation_timeout: float = 300,
        log_rounds: int = 0,
        is_centralized: bool = True,
        **unknown: Any,
    ) -> None:
        if unknown:
            parameter = next(iter(unknown))
            hint = " (did you mean merge_epochs?)" if parameter == "merge_epoch" else ""
            raise TypeError(
                f"FedAvgScheduler got an unexpected keyword argument {parameter!r}{hint}"
            )
        _whole("min_clients", min_clients, minimum=1)
        _whole("max_clients", max_clients, minimum=1)
        if max_clients < min_clients:
            raise ConfigurationError(
                "max_clients", max_clients, f"must be at least min_clients ({min_clients})"
            )
        _whole("max_rounds", max_rounds, minimum=0)
        _whole("merge_epochs", merge_epochs, minimum=1)
        _whole("log_rounds", log_rounds, minimum=0)
        if (
            not isinstance(calculation_timeout, numbers.Real)
            or isinstance(calculation_timeout, bool)
            or not calculation_timeout > 0
        ):
            raise ConfigurationError(
                "calculation_timeout", calculation_timeout, "must be a positive number of seconds"
            )
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigurationError(
                "name", name, "must be a non-empty string, or None to use the task id"
            )
        if name is not None:
            check_folder_name("name", name)
        if not isinstance(is_centralized, bool):
            raise ConfigurationError(
                "is_centralized",
                is_centralized,
                "must be True (the initiator aggregates) or False (a participant elected "
                "each round aggregates)",
            )
        self.min_clients = min_clients
        self.max_clients = max_clients
        self.name = name
        self.max_rounds = max_rounds
        self.merge_epochs = merge_epochs
        self.calculation_timeout = float(calculation_timeout)
        self.log_rounds = log_rounds
        self.is_centralized = is_centralized
        self.task_id = None
        self.current_round = 0
        self.model = None
        self.round_config = {}
        self.global_state = None
        self._context_validated = False

    def hyperparameters(self) -> dict[str, Any]:
        """What the scheduler was built with, defaults filled in, by parameter name."""
        args, kwargs = self._init_call
        try:
            bound = inspect.signature(type(self).__init__).bind(None, *args, **kwargs)
        except TypeError:
            return dict(kwargs)
        bound.apply_defaults()
        named = list(bound.arguments.items())[1:]  # not self
        flat: dict[str, Any] = {}
        for name, value in named:
            kind = inspect.signature(type(self).__init__).parameters[name].kind
            if kind == inspect.Parameter.VAR_KEYWORD:
                flat.update(value)
            elif kind != inspect.Parameter.VAR_POSITIONAL:
                flat[name] = value
        return flat

    # What every task defines.

    @abc.abstractmethod
    def make_model(self) -> nn.Module:
        """The model to train; attach an optimizer to ``self`` here if you need one."""

    @abc.abstractmethod
    def make_train_dataloader(self) -> DataLoader:
        """The loader over this node's training data."""

    @abc.abstractmethod
    def make_test_dataloader(self) -> DataLoader:
        """The loader over the test data the initiator evaluates on."""

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The tensors FedAvg averages; usually ``self.model.state_dict()``."""

    @abc.abstractmethod
    def load_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Put averaged tensors back; the mirror of ``state_dict``."""

    @abc.abstractmethod
    def train(self) -> None:
        """One local epoch on this node's data."""

    @abc.abstractmethod
    def test(self) -> Dict[str, Any]:
        """Evaluate ``self.model``; the numbers returned are the task's metrics."""

    # What a task's train() may call.

    def proximal_term(self) -> torch.Tensor:
        """FedProx's ``mu / 2 * ||w - w_global||^2``: add it to the loss in ``train()``.

        ``mu`` comes with each round from a ``FedProx`` strategy; under any
        other strategy the term is 0, so one ``train()`` serves them all::

            loss = F.nll_loss(self.model(images), labels) + self.proximal_term()

        Raises:
            TaskDefinitionError: if ``state_dict()`` does not name the model's
                parameters as ``self.model.state_dict()`` does.
        """
        mu = float(self.round_config.get("mu") or 0.0)
        model = self.model
        if not mu or self.global_state is None or model is None:
            device = next((p.device for p in model.parameters()), None) if model else None
            return torch.zeros((), device=device)
        return proximal_term(model, self.global_state, mu)

    # What a task may override.

    def validate_context(self) -> None:
        """Check this node can run the task; overrides must call this first."""
        self._context_validated = True
        if not isinstance(self.model, nn.Module):
            raise TaskDefinitionError(
                type(self).__name__, "has no model", "make_model() must return a torch.nn.Module"
            )
        check_state(self.state_dict())

    def is_task_finished(self) -> bool:
        """Whether to stop after the current round; by default at ``max_rounds``."""
        return self._is_reach_max_rounds()

    def _is_reach_max_rounds(self) -> bool:
        return self.current_round >= self.max_rounds

    def _tests_after(self, number: int, finished: bool) -> bool:
        """Whether round ``number`` ends with ``test()``: the first, the last (``finished``),
        and every ``log_rounds``-th."""
        log_rounds = self.log_rounds
        return number == 1 or finished or (log_rounds > 0 and number % log_rounds == 0)

    # Running it.

    def _setup(self, task_id: str) -> None:
        """Build the model and check the state it exposes, before round 1."""
        if not hasattr(self, "_context_validated"):
            raise TaskDefinitionError(
                type(self).__name__,
                "did not run FedAvgScheduler's __init__",
                "call super().__init__(...) in __init__",
            )
        self.task_id = task_id
        if self.name is None:
            check_folder_name("task_id", task_id)
            self.name = task_id
        model = self.make_model()
        if not isinstance(model, nn.Module):
            raise TaskDefinitionError(
                type(self).__name__,
                f"make_model() returned a {type(model).__name__}",
                "return a torch.nn.Module",
            )
        self.model = model
        check_state(self.state_dict())

    def _check_rounds(self) -> None:
        overrides_finish = type(self).is_task_finished is not Scheduler.is_task_finished
        if self.max_rounds <= 0 and not overrides_finish:
            raise ConfigurationError(
                "max_rounds",
                self.max_rounds,
                "must be positive, or override is_task_finished() to decide when to stop",
            )


def _whole(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigurationError(name, value, f"must be a whole number, at least {minimum}")


def test_metrics(values: Any) -> dict[str, Any]:
    """What ``test()`` returned, as metrics: numbers and strings by name; the rest ignored."""
    if not isinstance(values, dict):
        log.warning("test() returned a %s, not a dict of metrics; ignored", type(values).__name__)
        return {}
    metrics = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (numbers.Real, str)) and not isinstance(value, bool):
            metrics[str(key)] = (
                float(value)
                if isinstance(value, numbers.Real) and not isinstance(value, int)
                else value
            )
    return metrics
