"""``FedAvgScheduler``, the class a task's author subclasses, where the tutorial imports it.

    from fedmagic.fed_avg import FedAvgScheduler, FedSGDScheduler

What a task defines is :class:`fedmagic.engine.scheduler.Scheduler`; this
adds ``launch_task``, which runs the task the way the code around it asks:
to the end in a script, in the background in a ``%%fedavg_task`` cell, not
at all on a participant rebuilding the task from the code it received.
``FedSGDScheduler`` is the same with one gradient step per round, as the
reference platform offers it beside ``FedAvgScheduler``.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from .engine.context import current_context
from .engine.launch import run_task
from .engine.scheduler import Scheduler
from .errors import ConfigurationError, TaskDefinitionError, TaskFailed

__all__ = ["FedAvgScheduler", "FedSGDScheduler"]


class FedAvgScheduler(Scheduler):
    """A federated-averaging task: subclass it, then call ``launch_task``.

    It takes :class:`~fedmagic.engine.scheduler.Scheduler`'s arguments:
    ``min_clients``, ``max_clients``, ``name``, ``max_rounds``,
    ``merge_epochs``, ``calculation_timeout``, ``log_rounds``.
    """

    def launch_task(self, task_id: str, **options: Any) -> Any:
        """Run this task as its initiator and return its ``TaskResult``.

        In a ``%%fedavg_task`` cell, the task starts in the background and its
        ``TaskRun`` is returned at once (with ``--wait``, the ``TaskResult``);
        in a participant rebuilding the task from its code, nothing happens.

        Args:
            task_id: the id participants join with.
            **options: see :func:`fedmagic.engine.launch.start_task` (relay, token,
                join_timeout, resume, weighted, dataset_verify...).

        Raises:
            TaskFailed: if the task ends before ``is_task_finished()``.
        """
        context = current_context()
        if context is not None and context.launch is not None:
            return context.launch(self, task_id, options)
        try:
            return run_task(self, task_id, **options)
        except (TaskFailed, KeyboardInterrupt) as exc:
            # Expected endings: their message says it all, fedmagic's frames add nothing.
            raise exc.with_traceback(None) from None


class FedSGDScheduler(FedAvgScheduler):
    """FedSGD: each round, one gradient step on each participant's whole local data.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data" (2017): every participant computes the gradient of
    its loss over all of its training samples at the global weights and
    takes one step with it; the initiator averages the resulting models,
    weighted by sample counts, as FedAvg does. All steps start from the same
    weights with the same learning rate, so that average is the global
    weights minus the learning rate times the sample-weighted mean of the
    gradients: one step of full-batch gradient descent over everyone's data,
    none of which leaves its node.

    It takes :class:`FedAvgScheduler`'s arguments, with ``merge_epochs``
    fixed at 1; mixed into a FedAvg task of your own (``class
    MyFedSGD(FedSGDScheduler, MyTask)``), it takes that task's. The task is
    written as a FedAvg task is, with two differences:

    - ``make_train_dataloader()`` gives the node's whole training set in one
      batch: ``DataLoader(dataset, batch_size=len(dataset))``. Each node is
      weighted by ``len(dataset)``, so a loader with ``batch_size=None`` over
      a dataset whose one item is the whole batch runs, but counts as one sample.
      ``validate_context()`` checks the loader on each participant before
      round 1; one that splits the data fails verification saying so.
    - ``train()`` takes one optimizer step on that batch: zero the gradients,
      compute the mean loss over the batch, ``backward()``, ``step()``. A
      FedAvg task's epoch loop does exactly that when the loader has one
      batch. Plain SGD without momentum (``torch.optim.SGD(params, lr)``) is
      the textbook FedSGD; an optimizer with state (momentum, Adam) carries
      it from round to round on each node, so the average is no longer one
      step on the averaged gradient.

    Raises:
        ConfigurationError: for ``merge_epochs`` other than 1, or as
            :class:`FedAvgScheduler` does.
    """

    # No __init__ of its own, so a task mixing it in keeps its own constructor: signature,
    # defaults and hyperparameters(). merge_epochs is checked as that constructor sets it.

    @property
    def merge_epochs(self) -> int:
        """Local epochs a round: always 1, the one gradient step."""
        return 1

    @merge_epochs.setter
    def merge_epochs(self, value: int) -> None:
        if value != 1:
            raise ConfigurationError(
                "merge_epochs",
                value,
                "FedSGD takes one gradient step per round, so merge_epochs must be 1; "
                "use FedAvgScheduler for several local epochs per round",
            )

    def validate_context(self) -> None:
        """Check the training loader gives this node's whole data in one batch.

        Raises:
            ConfigurationError: for ``batch_size`` if it splits the data, or cannot count it.
            TaskDefinitionError: if ``make_train_dataloader()`` gives no DataLoader.
        """
        super().validate_context()
        loader = self.make_train_dataloader()
        if not isinstance(loader, DataLoader):
            raise TaskDefinitionError(
                type(self).__name__,
                f"make_train_dataloader() returned a {type(loader).__name__}",
                "a FedSGD task returns DataLoader(dataset, batch_size=len(dataset))",
            )
        samples = _length(loader.dataset)
        batches = _length(loader) if samples is not None else None
        if batches == 1:
            return
        if samples is None:
            problem = "its dataset has no len() to count its samples by"
        elif batches is None:
            problem = f"the loader cannot say how many batches its {samples} samples make"
        else:
            problem = f"the loader gives its {samples} samples in {batches} batches"
        raise ConfigurationError(
            "batch_size",
            loader.batch_size,
            f"FedSGD takes one step per round on this node's whole training set, but {problem}; "
            "return DataLoader(dataset, batch_size=len(dataset)) from make_train_dataloader()",
        )


def _length(sized: object) -> int | None:
    try:
        return len(sized)  # type: ignore[arg-type]
    except TypeError:  # an iterable dataset without __len__, and loaders over one
        return None
