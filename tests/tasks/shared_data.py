"""A small classification task whose training set is shared out by fedmagic.partition, so a
simulation and real participants can hold the very same shares.

On a participant (``party.NODE`` set: "a", "b", "c" ...), ``make_train_dataloader()``
gives that node's share; on the initiator, the whole set, which a simulation shares out
itself with the same scheme and seed. Training is deterministic (no shuffling, SGD
without momentum), so both paths compute the same updates.
"""

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from fedmagic import FedAvgScheduler
from fedmagic.partition import partition
from party import NODE

_DATA = torch.Generator().manual_seed(11)
INPUTS = torch.randn(90, 4, generator=_DATA)
LABELS = (INPUTS[:, 0] > 0).long() + (INPUTS[:, 1] > 0.5).long()
SEED = 5


def shares(participants: int):
    return partition(LABELS, participants, scheme="iid", seed=SEED).shares


class SharedData(FedAvgScheduler):
    def __init__(self, *args, participants: int = 3, failing: str = "", hold: str = "",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.participants = participants
        self.failing = failing
        self.hold = hold

    def make_model(self):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        return model

    def make_train_dataloader(self):
        whole = TensorDataset(INPUTS, LABELS)
        node = NODE.get(None)
        if node is not None:
            index = ord(node) - ord("a")
            whole = Subset(whole, shares(self.participants)[index].tolist())
        return DataLoader(whole, batch_size=8, shuffle=False)

    def make_test_dataloader(self):
        return DataLoader(TensorDataset(INPUTS, LABELS), batch_size=90)

    def state_dict(self): return self.model.state_dict()
    def load_state_dict(self, state_dict): self.model.load_state_dict(state_dict)

    def train(self):
        if self.hold and _claim(Path(self.hold)):
            time.sleep(300)  # until the test kills this process
        for inputs, labels in self.make_train_dataloader():
            if self.failing and float(inputs[0, 0]) == float(INPUTS[int(self.failing), 0]):
                raise RuntimeError("simulated failure on the share holding a chosen example")
            self.optimizer.zero_grad()
            F.cross_entropy(self.model(inputs), labels).backward()
            self.optimizer.step()

    def test(self):
        inputs, labels = INPUTS, LABELS
        with torch.no_grad():
            output = self.model(inputs)
        return {"loss": float(F.cross_entropy(output, labels)),
                "accuracy": float((output.argmax(1) == labels).float().mean())}


def _claim(directory: Path) -> bool:
    """Whether this process took the one ``hold`` ticket the test laid in ``directory``."""
    try:
        os.rename(directory / "hold", directory / f"held-{os.getpid()}")
    except FileNotFoundError:
        return False
    return True
