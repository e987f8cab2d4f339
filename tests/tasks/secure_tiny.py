"""A task of 1,024 weights whose training leaves them at a value of each node's own.

Each participant's coroutine sets ``NODE``; each round's model is then a
hand computation, and a masked upload is long enough to tell from the
update it hides.
"""

import torch

from fedmagic import FedAvgScheduler
from party import NODE

#: What each node's training leaves every weight at, and how many samples it has.
VALUES = {"a": 0.1, "b": 0.2, "c": 0.4, "d": 0.8, "e": 0.5}
SAMPLES = {"a": 10, "b": 30, "c": 60, "d": 100, "e": 50}


class SecureTiny(FedAvgScheduler):
    def make_model(self):
        model = torch.nn.Linear(32, 32, bias=False)
        torch.nn.init.zeros_(model.weight)
        return model

    def make_train_dataloader(self):
        count = SAMPLES[NODE.get()]
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(count)))

    def make_test_dataloader(self): return []
    def state_dict(self): return self.model.state_dict()
    def load_state_dict(self, state_dict): self.model.load_state_dict(state_dict)

    def train(self):
        with torch.no_grad():
            self.model.weight.fill_(VALUES[NODE.get()])

    def test(self):
        return {"w": float(self.model.weight.detach().mean())}
