"""Accuracy and round overhead of each strategy, on the digits task, in one run.

Accuracy: the digits task (the tutorial's ConvNet, DigitsScheduler's SGD and batch size)
for 10 rounds of the demo's 2 local epochs, on an IID and a by-label split of
scikit-learn's digits (``fedmagic.digits.write_partitions``) with 3 participants, under
FedAvg, FedProx, FedAdam and FedYogi. Beside each, a centralized baseline: the same
scheduler's ``train()`` from the same initial weights, for the same 20 epochs, on the
union of the participants' training data; every run is tested on the same held-out set.

Every party runs in this process: the initiator's ``Aggregator`` and one
``ParticipantRuntime`` per node over a ``MemoryRelay``, each participant building the task
from its source as ``fedmagic join`` does, without a process (and a torch import) each.
They share one working directory, so the task is ``NodeDigits``: DigitsScheduler reading
the data of the party whose coroutine runs it (``harness.PARTY``). They share torch's
global RNG, so participants train one at a time, each epoch seeded by its node and its
count. DigitsScheduler seeds the initial weights. Reruns agree but for the order updates
arrive in, which the float32 sum sees in its last bits: a figure may move by a digit or two.

Round overhead: the same ConvNet with nothing to train (each participant sends back the
weights it got), N participants in this process over a ``MemoryRelay``. A round's time is
from one round's end to the next's, checkpoint included; strategies alternate across
repetitions and each one's median round is set beside FedAvg's; FedAvg run a second time,
against itself, shows how much of a difference is noise. Target: a strategy adds under 1 ms
per participant per round. FedProx's own cost is on the participants, in ``train()``: a
training batch of the task's is timed without and with its proximal term, and the difference
scaled to a participant's batches in a round.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import inspect
import itertools
import logging
import math
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Sequence

if __name__ == "__main__":  # this tree's fedmagic, not a copy installed from an older wheel
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torchvision
from harness import PARTY, TRAINING, alternated, run_in_memory
from torch.utils.data import DataLoader, TensorDataset

from fedmagic import FedAvgScheduler
from fedmagic.digits import Party, write_mnist, write_partitions
from fedmagic.examples.digits_task import NORMALIZE, ConvNet, DigitsScheduler
from fedmagic.strategies import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
    proximal_term,
)

#: FedProx's mu, from Li et al.'s grid {0.001, 0.01, 0.1, 1}.
MU = 0.01
#: The server learning rate FedAdam and FedYogi are also run with, beside their default.
ETA = 0.1
DEFAULT_ETA = FedAdam().eta
#: Krum's tolerated arbitrary updates: it needs more than 2f + 2 a round.
KRUM_F = 1

StrategyMaker = Callable[[], Strategy]

#: FedAvg timed a second time: its difference from FedAvg is the measurement's noise.
CONTROL = "FedAvg, again"

ACCURACY: dict[str, StrategyMaker] = {
    "FedAvg": FedAvg,
    f"FedProx(mu={MU:g})": functools.partial(FedProx, mu=MU),
    f"FedAdam(eta={DEFAULT_ETA:g})": FedAdam,
    f"FedAdam(eta={ETA:g})": functools.partial(FedAdam, eta=ETA),
    f"FedYogi(eta={FedYogi().eta:g})": FedYogi,
    f"FedYogi(eta={ETA:g})": functools.partial(FedYogi, eta=ETA),
}

OVERHEAD: dict[str, StrategyMaker] = {
    "FedAvg": FedAvg,
    f"FedProx(mu={MU:g})": functools.partial(FedProx, mu=MU),
    "FedAvgM": FedAvgM,
    "FedAdam": FedAdam,
    "FedYogi": FedYogi,
    "FedAdagrad": FedAdagrad,
    "FedMedian": FedMedian,
    "FedTrimmedAvg(beta=0.1)": FedTrimmedAvg,
    f"Krum(f={KRUM_F})": functools.partial(Krum, f=KRUM_F),
    CONTROL: FedAvg,
}

class NodeDigits(DigitsScheduler):
    """The digits task for parties sharing one process: each reads its own party's data,
    and trains alone, seeded by its node and epoch."""

    epochs_trained = 0

    def _digits(self, train: bool) -> torchvision.datasets.MNIST:
        root = PARTY.get().data_dir
        return torchvision.datasets.MNIST(root, train=train, download=False, transform=NORMALIZE)

    def train(self) -> None:
        self.epochs_trained += 1
        with TRAINING:
            torch.manual_seed(zlib.crc32(f"{PARTY.get().name}/{self.epochs_trained}".encode()))
            super().train()


class Echo(FedAvgScheduler):
    """The ConvNet with nothing to train: its rounds are the framework's work alone."""

    def make_model(self) -> torch.nn.Module:
        return ConvNet()

    def make_train_dataloader(self) -> DataLoader:
        # one placeholder sample, never read: an update that reports none has no weight
        return DataLoader(TensorDataset(torch.zeros(1)))

    def make_test_dataloader(self) -> list:
        return []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict)

    def train(self) -> None:
        pass

    def test(self) -> dict:
        return {}


# -- accuracy --------------------------------------------------------------------------------


def union_of(nodes: Sequence[Party], home: Path) -> Party:
    """One party holding every node's training data, and the same test set."""
    train = [torchvision.datasets.MNIST(node.data_dir, train=True) for node in nodes]
    test = torchvision.datasets.MNIST(nodes[0].data_dir, train=False)
    images = np.concatenate([part.data.numpy() for part in train])
    labels = np.concatenate([part.targets.numpy() for part in train]).astype(np.uint8)
    root = write_mnist(
        home / "data", images, labels, test.data.numpy(), test.targets.numpy().astype(np.uint8)
    )
    return Party("union", home, root, len(images))


def centralized(union: Party, rounds: int, epochs: int) -> list[float]:
    """Test accuracy after each ``epochs`` epochs of the task's ``train()`` on ``union``."""
    context = contextvars.copy_context()
    context.run(PARTY.set, union)
    scheduler = NodeDigits(1, 1, name="centralized", max_rounds=rounds, merge_epochs=epochs)
    scheduler.model = scheduler.make_model()
    accuracies = []
    for _ in range(rounds):
        for _ in range(epochs):
            context.run(scheduler.train)
        accuracies.append(context.run(scheduler.test)["accuracy"])
    return accuracies


def federated(
    split: Path, parties: list[Party], maker: StrategyMaker, rounds: int, epochs: int
) -> list[float]:
    """Test accuracy after each round of the digits task under a strategy."""
    count = len(parties) - 1
    scheduler = NodeDigits(
        count, count, name="digits", max_rounds=rounds, merge_epochs=epochs, log_rounds=1
    )
    checkpoint = Path(tempfile.mkdtemp(dir=split, prefix="models-"))
    result = run_in_memory(scheduler, maker(), parties[0], parties[1:], checkpoint)
    return [row["accuracy"] for row in result.history]


def accuracy_table(workdir: Path, participants: int, rounds: int, epochs: int) -> int:
    """Print the table; return the most training images a participant held."""
    finals: dict[str, dict[str, float]] = {}
    most = 0
    for split in ("iid", "by-label"):
        layout = write_partitions(workdir / split, participants, split=split)
        if not finals:
            print(
                f"accuracy on the {layout.test_size} held-out digits: {participants} "
                f"participants, {rounds} rounds of {epochs} local epochs (final: after the last "
                f"round, best: any round's); centralized: {rounds * epochs} epochs on the union "
                "of their data"
            )
            print(f"{'split':<9} {'strategy':<18} {'final':>7} {'best':>7} {'centralized':>12}")
        baseline = centralized(union_of(layout.nodes, workdir / split / "union"), rounds, epochs)
        finals[split] = {}
        for label, maker in ACCURACY.items():
            accuracies = federated(
                workdir / split, [layout.initiator, *layout.nodes], maker, rounds, epochs
            )
            finals[split][label] = accuracies[-1]
            print(
                f"{split:<9} {label:<18} {accuracies[-1]:7.1%} {max(accuracies):7.1%} "
                f"{baseline[-1]:12.1%}",
                flush=True,
            )
        most = max(most, *(node.train_size for node in layout.nodes))
    print("the server learning rate: FedAdam's and FedYogi's final accuracy minus FedAvg's")
    for split, final in finals.items():
        for name in ("FedAdam", "FedYogi"):
            default, tuned = (
                final[f"{name}(eta={eta:g})"] - final["FedAvg"] for eta in (DEFAULT_ETA, ETA)
            )
            print(
                f"  {split:<9} {name}: {default * 100:+5.1f} points at the default "
                f"eta={DEFAULT_ETA:g} (Reddi et al.'s), {tuned * 100:+5.1f} at eta={ETA:g}"
            )
    return most


# -- round overhead --------------------------------------------------------------------------


def round_seconds(maker: StrategyMaker, count: int, rounds: int, workdir: Path) -> list[float]:
    """Seconds of each round but the first of an ``Echo`` task with ``count`` participants."""
    ended: list[float] = []

    def on_event(text: str) -> None:
        if text.startswith("round ") and "averaged" in text:
            ended.append(time.perf_counter())

    nodes = [Party(f"node-{index}", workdir, workdir, 0) for index in range(count)]
    scheduler = Echo(min_clients=count, max_clients=count, max_rounds=rounds + 1)
    checkpoint = Path(tempfile.mkdtemp(dir=workdir, prefix="models-"))
    run_in_memory(scheduler, maker(), nodes[0], nodes, checkpoint, on_event)
    return [later - earlier for earlier, later in itertools.pairwise(ended)]


def training_batch_ms(batch_size: int, repeats: int = 300) -> tuple[float, float]:
    """Median milliseconds of one of the task's SGD steps on the ConvNet, without and with
    FedProx's term in the loss, alternated."""
    model = ConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    reference = {name: value.clone() for name, value in model.state_dict().items()}
    images, labels = torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
    times: dict[bool, list[float]] = {False: [], True: []}
    model.train()
    for repeat in range(repeats):
        for with_term in (repeat % 2 == 0, repeat % 2 == 1):
            started = time.perf_counter()
            optimizer.zero_grad()
            loss = torch.nn.functional.nll_loss(model(images), labels)
            if with_term:
                loss = loss + proximal_term(model, reference, MU)
            loss.backward()
            optimizer.step()
            times[with_term].append(time.perf_counter() - started)
    return statistics.median(times[False]) * 1000, statistics.median(times[True]) * 1000


def overhead_table(workdir: Path, counts: Sequence[int], repeats: int, rounds: int) -> None:
    print(
        f"\nround overhead: a round's wall time with the ConvNet and nothing to train "
        f"(median of {repeats} repetitions of {rounds} rounds, strategies alternated), and "
        "its difference from FedAvg's divided by N"
    )
    print(f"{'N':>3} {'strategy':<24} {'median round':>13} {'vs FedAvg, per participant':>27}")
    for count in counts:
        measure = functools.partial(round_seconds, count=count, rounds=rounds, workdir=workdir)
        times = alternated(OVERHEAD, repeats, measure)
        fedavg = statistics.median(times["FedAvg"])
        for label, seconds in times.items():
            median = statistics.median(seconds)
            added = (median - fedavg) / count * 1000
            if label == "FedAvg":
                verdict = ""
            elif label == CONTROL:
                verdict = "  FedAvg against itself: the noise"
            else:
                verdict = "  under 1 ms" if added < 1 else "  OVER 1 ms"
            print(
                f"{count:3d} {label:<24} {median * 1000:10.1f} ms {added:+21.3f} ms{verdict}",
                flush=True,
            )


def fedprox_on_participants(train_size: int, epochs: int) -> None:
    batch_size = inspect.signature(DigitsScheduler).parameters["batch_size"].default
    batches = math.ceil(train_size / batch_size)
    plain, with_term = training_batch_ms(batch_size)
    added = (with_term - plain) * batches * epochs
    print(
        "\nFedProx's own cost, in each participant's train() rather than the round loop: "
        "a training batch's median time without and with its proximal term"
    )
    print(
        f"  a batch of {batch_size}: {plain:.2f} ms, {with_term:.2f} ms with the term "
        f"({with_term - plain:+.2f} ms); {batches} batches an epoch for {train_size} images "
        f"x {epochs} epochs: {added:+.1f} ms per participant per round"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds, fewer repeats")
    options = parser.parse_args()
    logging.getLogger("fedmagic").setLevel(logging.WARNING)
    started = time.perf_counter()
    rounds, epochs = (2 if options.quick else 10), 2
    with tempfile.TemporaryDirectory(prefix="fedmagic-strategies-") as temporary:
        workdir = Path(temporary)
        train_size = accuracy_table(workdir, participants=3, rounds=rounds, epochs=epochs)
        overhead_table(
            workdir,
            counts=(10,) if options.quick else (10, 30),
            repeats=2 if options.quick else 5,
            rounds=3 if options.quick else 8,
        )
    fedprox_on_participants(train_size, epochs)
    print(f"\nelapsed: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
