"""A small linear regression under FedSGD, with data of its own on each node.

Each participant's coroutine sets ``NODE`` (:mod:`party`), so nodes in one
process read different rows. ``Regression`` is an ordinary FedAvg task and
``SgdTiny`` mixes FedSGD into it, as a task's author would; a test computes
each round by hand: one step of full-batch gradient descent on every row.
"""

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedmagic import FedAvgScheduler, FedSGDScheduler
from party import NODE

#: Each node's rows, ``(x1, x2, y)``: different data, and different counts of it.
DATA = {
    "a": [(1.0, 2.0, 3.0), (0.5, -1.0, 0.0)],
    "b": [(2.0, 0.0, 5.0), (-1.0, 1.0, -2.0), (0.0, 3.0, 1.5)],
    "c": [(1.5, 1.5, 4.0), (-2.0, -0.5, -3.5), (3.0, -1.0, 6.0), (0.0, 0.5, 1.0),
          (1.0, 1.0, 2.5)],
}


class Regression(FedAvgScheduler):
    """``y = w . x + b`` by mean squared error, from zero weights, with plain SGD."""

    def __init__(self, min_clients, max_clients, max_rounds=3, learning_rate=0.1,
                 batch_sizes=None, **kwargs):
        super().__init__(min_clients=min_clients, max_clients=max_clients,
                         max_rounds=max_rounds, **kwargs)
        self.learning_rate = learning_rate
        #: Nodes whose loader splits their rows in batches of this size; the rest: one batch.
        self.batch_sizes = batch_sizes or {}

    def make_model(self):
        model = torch.nn.Linear(2, 1)
        torch.nn.init.zeros_(model.weight)
        torch.nn.init.zeros_(model.bias)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=self.learning_rate)
        return model

    def make_train_dataloader(self):
        rows = torch.tensor(DATA[NODE.get()])
        dataset = TensorDataset(rows[:, :2], rows[:, 2])
        return DataLoader(dataset, batch_size=self.batch_sizes.get(NODE.get(), len(dataset)))

    def make_test_dataloader(self): return []
    def state_dict(self): return self.model.state_dict()
    def load_state_dict(self, state_dict): self.model.load_state_dict(state_dict)

    def train(self):
        for x, y in self.make_train_dataloader():
            self.optimizer.zero_grad()
            F.mse_loss(self.model(x).squeeze(-1), y).backward()
            self.optimizer.step()

    def test(self):
        weight = self.model.weight.detach()[0]
        return {"w1": float(weight[0]), "w2": float(weight[1]), "b": float(self.model.bias.detach())}


class SgdTiny(FedSGDScheduler, Regression):
    """The regression as FedSGD: one step a round on each node's whole data."""
