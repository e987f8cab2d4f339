"""The digits task, with nodes that misbehave on purpose.

Every node runs this same code (one hash); what each does wrong comes from
its own environment, ``FEDMAGIC_TEST_FAULT``, as a buggy or hostile data
owner's machine would.
"""

import os
import time
from pathlib import Path

import torch

from fedmagic.examples.digits_task import DatasetVerify, DigitsScheduler  # noqa: F401

FAULT = os.environ.get("FEDMAGIC_TEST_FAULT", "")


class FaultyDigits(DigitsScheduler):

    def train(self) -> None:
        if FAULT == "crash":
            raise RuntimeError("simulated failure in this node's training loop")
        if FAULT == "hang":
            Path("training.started").touch()
            time.sleep(120)
        if FAULT == "slow":
            time.sleep(1.5)
        super().train()
        self._corrupt_next_upload = FAULT in ("nan", "shape")

    def state_dict(self):
        state = super().state_dict()
        if getattr(self, "_corrupt_next_upload", False):
            self._corrupt_next_upload = False
            state = dict(state)
            if FAULT == "nan":
                state["fc1.weight"] = state["fc1.weight"].clone()
                state["fc1.weight"][0, 0] = float("nan")
            else:
                state["fc2.bias"] = torch.zeros(11)
        return state


class FlaggedDigits(DigitsScheduler):
    """Keeps a torch.bool buffer in its state dict, which FedAvg cannot average."""

    def make_model(self):
        model = super().make_model()
        model.register_buffer("active", torch.ones(3, dtype=torch.bool))
        return model
