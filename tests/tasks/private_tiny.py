"""A small classifier that trains for real: what DP-SGD on participants is tried on.

64 examples of 3 features in 2 classes, batches of 16 (a sampling rate of
1/4), plain SGD with learning rate 1; ``test()`` reports the weights' norm.
"""

import torch
import torch.nn.functional as F

from fedmagic import FedAvgScheduler

FEATURES = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
LABELS = (FEATURES.sum(dim=1) > 0).long()


class PrivateTiny(FedAvgScheduler):
    def make_model(self):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        return model

    def make_train_dataloader(self):
        dataset = torch.utils.data.TensorDataset(FEATURES, LABELS)
        return torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True)

    def make_test_dataloader(self): return []
    def state_dict(self): return self.model.state_dict()
    def load_state_dict(self, state_dict): self.model.load_state_dict(state_dict)

    def train(self):
        for features, labels in self.make_train_dataloader():
            self.optimizer.zero_grad()
            F.cross_entropy(self.model(features), labels).backward()
            self.optimizer.step()

    def test(self):
        return {"norm": float(torch.cat([p.detach().flatten() for p in
                                         self.model.parameters()]).norm())}


class WithBatchNorm(PrivateTiny):
    def make_model(self):
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        return model


class WithoutOptimizer(PrivateTiny):
    def make_model(self):
        return torch.nn.Linear(3, 2)

    def train(self):
        pass
