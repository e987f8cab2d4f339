"""The smallest task there is: one weight vector, no data, no training.

``test()`` reports the mean weight, so a test can read what the round loop
averaged; the round loop's own work is all that runs.
"""

import time

import torch

from fedmagic import FedAvgScheduler


class Tiny(FedAvgScheduler):
    def make_model(self): return torch.nn.Linear(4, 1, bias=False)
    def make_train_dataloader(self): return []
    def make_test_dataloader(self): return []
    def state_dict(self): return self.model.state_dict()
    def load_state_dict(self, state_dict): self.model.load_state_dict(state_dict)
    def train(self): pass
    def test(self): return {"w": float(self.model.weight.detach().mean())}


class SlowTiny(Tiny):
    """Tiny whose every epoch takes a while, like a real model's."""

    def __init__(self, *args, epoch_seconds: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch_seconds = epoch_seconds

    def train(self): time.sleep(self.epoch_seconds)
