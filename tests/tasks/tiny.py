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


class ZeroTiny(Tiny):
    """Tiny starting from zero weights, so a test can compute its rounds by hand."""

    def make_model(self):
        model = super().make_model()
        torch.nn.init.zeros_(model.weight)
        return model


class ProxTiny(ZeroTiny):
    """Two steps of SGD (lr 0.1) on ``||w - 1||²`` plus FedProx's term, from the global weights."""

    def make_train_dataloader(self):  # one sample, so updates carry a weight
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(1)))

    def train(self):
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            loss = (self.model.weight - 1).pow(2).sum() + self.proximal_term()
            loss.backward()
            optimizer.step()
