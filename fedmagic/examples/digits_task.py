"""Handwritten digits, federated: a task in the reference tutorial's style.

Run it as a script on the initiator; participants receive this file's source
and rebuild ``DigitsScheduler`` (or ``DigitsFedSGD``, with ``--fedsgd``)
with the same arguments. Every party reads MNIST-format data from
``<name>/data`` in its working directory (write some with ``fedmagic
digits``); nothing is downloaded.
"""

import argparse
import os
from typing import Any, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader

from fedmagic.fed_avg import FedAvgScheduler, FedSGDScheduler
from fedmagic.log import logger
from fedmagic.strategies import BY_NAME, DifferentialPrivacy, SecureAggregation

NORMALIZE = torchvision.transforms.Compose(
    [
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize((0.1307,), (0.3081,)),
    ]
)


class ConvNet(nn.Module):
    """Two convolutions and two dense layers: LeNet's shape, MNIST's classic."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.dropout(x, training=self.training)
        return F.log_softmax(self.fc2(x), dim=-1)


class DigitsScheduler(FedAvgScheduler):
    def __init__(
        self,
        min_clients: int,
        max_clients: int,
        name: str = None,
        max_rounds: int = 5,
        merge_epochs: int = 1,
        calculation_timeout: int = 120,
        log_rounds: int = 1,
        batch_size: int = 32,
        learning_rate: float = 0.05,
        momentum: float = 0.5,
        is_centralized: bool = True,
    ) -> None:
        super().__init__(
            min_clients=min_clients,
            max_clients=max_clients,
            name=name,
            max_rounds=max_rounds,
            merge_epochs=merge_epochs,
            calculation_timeout=calculation_timeout,
            log_rounds=log_rounds,
            is_centralized=is_centralized,
        )
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(42)

    def make_model(self) -> nn.Module:
        model = ConvNet().to(self.device)
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=self.learning_rate, momentum=self.momentum
        )
        return model

    def _digits(self, train: bool) -> torchvision.datasets.MNIST:
        return torchvision.datasets.MNIST(
            os.path.join(self.name, "data"), train=train, download=False, transform=NORMALIZE
        )

    def make_train_dataloader(self) -> DataLoader:
        return DataLoader(self._digits(train=True), batch_size=self.batch_size, shuffle=True)

    def make_test_dataloader(self) -> DataLoader:
        return DataLoader(self._digits(train=False), batch_size=256, shuffle=False)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict)

    def validate_context(self) -> None:
        super().validate_context()
        train_set = self.make_train_dataloader().dataset
        assert len(train_set) > 0, "no training images on this node"
        logger.info(f"{len(train_set)} training images on this node")

    def train(self) -> None:
        self.model.train()
        for images, labels in self.make_train_dataloader():
            images, labels = images.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad()
            # proximal_term() is FedProx's pull towards the global model: 0 under other strategies
            loss = F.nll_loss(self.model(images), labels) + self.proximal_term()
            loss.backward()
            self.optimizer.step()

    def test(self) -> Dict[str, Any]:
        self.model.eval()
        loader = self.make_test_dataloader()
        total_loss, correct = 0.0, 0
        with torch.no_grad():
            for images, labels in loader:
                images, labels = images.to(self.device), labels.to(self.device)
                output = self.model(images)
                total_loss += F.nll_loss(output, labels, reduction="sum").item()
                correct += (output.argmax(dim=1) == labels).sum().item()
        count = len(loader.dataset)
        return {"loss": total_loss / count, "accuracy": correct / count}


class DigitsFedSGD(FedSGDScheduler, DigitsScheduler):
    """The same task as FedSGD: each round, one gradient step on each node's whole data.

    Everything but the training loader comes from ``DigitsScheduler``; its
    ``train()`` loop takes one step when the loader holds one batch. Give it
    a larger learning rate, no momentum and more rounds than FedAvg needs.
    """

    def make_train_dataloader(self) -> DataLoader:
        train_set = self._digits(train=True)
        return DataLoader(train_set, batch_size=len(train_set))


class DatasetVerify:
    """Runs on each participant before it trains: is the data there and readable?"""

    #: Where the data is: ``<name>/data`` for the scheduler's default name.
    ROOT = os.path.join("demo_task", "data")
    FILES = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]

    def __init__(self, task_id, current_node):
        self.task_id = task_id
        self.current_node = current_node

    def run(self) -> bool:
        root = self.ROOT
        raw = os.path.join(root, "MNIST", "raw")
        missing = [name for name in self.FILES if not os.path.isfile(os.path.join(raw, name))]
        if missing:
            logger.warning(f"{self.current_node}: missing {missing} under {raw}")
            return False
        return len(torchvision.datasets.MNIST(root, train=True, download=False)) > 0


#: The L2 norm each update is clipped to under --dp-epsilon: small, so that the noise on the
#: mean of a few participants, z * clip / participants per weight, does not swamp the model.
DP_CLIP = 0.1

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits", help="the task id participants join")
    parser.add_argument("--rounds", type=int, help="default 10; 100 with --fedsgd")
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round (FedAvg)")
    parser.add_argument("--min-clients", type=int, default=2)
    parser.add_argument("--max-clients", type=int, default=3)
    parser.add_argument(
        "--strategy", choices=BY_NAME, help="how each round combines updates (default fedavg)"
    )
    parser.add_argument(
        "--fedsgd",
        action="store_true",
        help="DigitsFedSGD: one full-batch step a round, learning rate 0.5, no momentum",
    )
    parser.add_argument(
        "--decentralized",
        action="store_true",
        help="each round, a participant elected in turn aggregates it (is_centralized=False)",
    )
    parser.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="SecureAggregation around the strategy: the initiator sees only each round's sum",
    )
    parser.add_argument(
        "--dp-epsilon",
        type=float,
        metavar="EPS",
        help="differential privacy: noise calibrated to spend at most EPS over the rounds, "
        f"at delta 1e-5, each update clipped to L2 norm {DP_CLIP:g}",
    )
    options = parser.parse_args()
    if options.fedsgd:
        scheduler = DigitsFedSGD(
            min_clients=options.min_clients,
            max_clients=options.max_clients,
            name="demo_task",
            max_rounds=options.rounds or 100,
            log_rounds=10,
            learning_rate=0.5,
            momentum=0.0,
            is_centralized=not options.decentralized,
        )
    else:
        scheduler = DigitsScheduler(
            min_clients=options.min_clients,
            max_clients=options.max_clients,
            name="demo_task",
            max_rounds=options.rounds or 10,
            merge_epochs=options.epochs,
            is_centralized=not options.decentralized,
        )
    strategy = options.strategy
    if options.dp_epsilon is not None:
        strategy = DifferentialPrivacy(
            BY_NAME[strategy or "fedavg"](),
            clip=DP_CLIP,
            target_epsilon=options.dp_epsilon,
            delta=1e-5,
            rounds=scheduler.max_rounds,
        )
    if options.secure_aggregation:
        inner = strategy if isinstance(strategy, DifferentialPrivacy) else None
        strategy = SecureAggregation(inner or BY_NAME[options.strategy or "fedavg"]())
    result = scheduler.launch_task(task_id=options.task, strategy=strategy)
    print(
        f"final accuracy {result.metrics['accuracy']:.1%} after {result.rounds} rounds; "
        f"checkpoint in {result.checkpoint}"
    )
    secure = [row for row in result.history if "error_bound" in row]
    if secure:
        counts = sorted({row["participants"] for row in secure})
        print(
            f"secure aggregation: the initiator saw {len(secure)} rounds' sums of "
            f"{' or '.join(map(str, counts))} masked updates, revealed with threshold "
            f"t={min(row['threshold'] for row in secure)}, and never one update; quantisation "
            f"moved the mean by at most {max(row['error_bound'] for row in secure):.2g} per weight"
        )
    if options.dp_epsilon is not None and result.history:
        # The noise on each weight of the mean: z * clip over the expected participants
        private = strategy.strategy if options.secure_aggregation else strategy
        z, expected = private.describe()["noise_multiplier"], options.max_clients
        last = result.history[-1]
        # Distributed: each of the round's m updates carries z / sqrt(t) of its own
        spread = (last["participants"] / last["threshold"]) ** 0.5 if last in secure else 1
        print(
            f"epsilon {last['epsilon']:.3g} spent at delta 1e-05; the noise on each weight of "
            f"the mean had sd {z * DP_CLIP * spread / expected:.3g} (noise multiplier {z:.3g}, "
            f"clip {DP_CLIP:g}, "
            f"{expected} participants"
            + (", added by the participants" if options.secure_aggregation else "")
            + "): it shrinks with more participants"
        )
