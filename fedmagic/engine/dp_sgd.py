"""DP-SGD on a participant: the task's own model and optimizer, made private with Opacus.

The task's ``train()`` runs unchanged: Opacus's hooks on the model record
each example's gradient as the loss goes backward, and its optimizer, put in
place of ``self.optimizer``, clips them and adds noise before every step.
The state dict keeps its names (the model itself is not wrapped), so the
update the node sends is the one the task's ``state_dict()`` always gave.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch

from ..errors import TaskDefinitionError
from .scheduler import Scheduler

__all__ = ["PrivateOptimizer"]


class PrivateOptimizer:
    """A participant's task, trained with DP-SGD; ``epsilon`` is what it spent so far.

    Args:
        scheduler: the task, set up (its model and optimizer made).
        parameters: ``PrivateTraining``'s described parameters: ``noise_multiplier``,
            ``max_grad_norm`` and ``delta``.

    Raises:
        TaskDefinitionError: if the model has layers Opacus cannot train
            privately, or the task keeps no ``self.optimizer``, or its loader has
            no batch size and length to tell a sampling rate by.
    """

    def __init__(self, scheduler: Scheduler, parameters: Mapping[str, Any]) -> None:
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator

        task = type(scheduler).__name__
        model = scheduler.model
        assert model is not None, "the task is set up before it is made private"
        problems = ModuleValidator.validate(model, strict=False)
        if problems:
            raise TaskDefinitionError(
                task,
                f"has a model DP-SGD cannot train: {str(problems[0]).split('. ')[0]}",
                "use layers Opacus supports (GroupNorm instead of BatchNorm; "
                "opacus.validators.ModuleValidator.fix(model) swaps them), or a strategy "
                "without PrivateTraining",
            )
        optimizer = getattr(scheduler, "optimizer", None)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TaskDefinitionError(
                task,
                "keeps no torch optimizer as self.optimizer, which DP-SGD makes private",
                "make it in make_model(), as self.optimizer = torch.optim.SGD(...)",
            )
        loader = scheduler.make_train_dataloader()
        batch_size = getattr(loader, "batch_size", None)
        dataset = getattr(loader, "dataset", None)
        try:
            examples = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            examples = 0
        if not batch_size or not examples:
            raise TaskDefinitionError(
                task,
                "has a training loader without a batch size and a dataset of known length",
                "return a DataLoader(dataset, batch_size=...) from make_train_dataloader(): "
                "DP-SGD's epsilon depends on the share of examples in each batch",
            )
        self.delta = float(parameters["delta"])
        self.sample_rate = min(batch_size / examples, 1.0)
        self._accountant = RDPAccountant()
        with warnings.catch_warnings():  # Opacus's note on secure RNG: the noise is torch's
            warnings.simplefilter("ignore")
            self._hooks = GradSampleModule(model)  # hooks on the model's own layers
            private = DPOptimizer(
                optimizer,
                noise_multiplier=float(parameters["noise_multiplier"]),
                max_grad_norm=float(parameters["max_grad_norm"]),
                expected_batch_size=batch_size,
            )
        private.attach_step_hook(
            self._accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate)
        )
        scheduler.optimizer = private  # type: ignore[attr-defined]
        # Opacus's hooks fire on layers whose inputs need no gradient (the first): as meant
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)

    @property
    def epsilon(self) -> float:
        """Epsilon this node's training spent so far, at ``delta``; 0 before its first step."""
        if not self._accountant.history:
            return 0.0
        return float(self._accountant.get_epsilon(delta=self.delta))
