"""``FedSGDScheduler``: each round, one gradient step on each participant's whole data.

The initiator's ``Aggregator`` and real participant runtimes run in this
process over the in-memory relay, each participant with rows of its own
(:mod:`sgd_tiny`); the model each round leaves is computed by hand, in
float64, as full-batch gradient descent on every node's rows together.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fedmagic.engine.checkpoint import Checkpoint
from fedmagic.engine.participant import ParticipantRuntime
from fedmagic.engine.policy import RoundPolicy
from fedmagic.engine.rounds import Aggregator, TaskResult
from fedmagic.engine.task import TaskPackage
from fedmagic.errors import ConfigurationError
from party import NODE
from sgd_tiny import DATA, SgdTiny
from test_rounds import TOKEN, a_relay

pytestmark = pytest.mark.timeout(60)


def run_fedsgd(tmp_path, nodes: list[str], *, rounds: int = 3, is_centralized: bool = True,
               batch_sizes: dict[str, int] | None = None,
               ) -> tuple[TaskResult, str, dict[str, Any]]:
    """Run SgdTiny with a participant per node; its result, event log and each node's
    outcome."""
    events: list[str] = []

    async def scenario():
        async with a_relay("memory") as connect:
            scheduler = SgdTiny(min_clients=2, max_clients=len(nodes), max_rounds=rounds,
                                learning_rate=0.1, batch_sizes=batch_sizes,
                                calculation_timeout=20, is_centralized=is_centralized)
            scheduler._setup("rounds")
            package = TaskPackage.from_scheduler(scheduler, "rounds")
            link = await connect(role="initiator", task="rounds", token=TOKEN)
            aggregator = Aggregator(scheduler, package, link,
                                    checkpoint=Checkpoint(tmp_path / "models" / "rounds"),
                                    policy=RoundPolicy(join_timeout=20, join_grace=2),
                                    on_event=events.append)

            async def take_part(node: str):
                NODE.set(node)
                joined = await connect(role="participant", task="rounds", token=TOKEN,
                                       node=node, wait=10)
                return await ParticipantRuntime(joined, node, lambda package: True).run()

            parties = [asyncio.create_task(take_part(node)) for node in nodes]
            result = await aggregator.run()
            outcomes = await asyncio.wait_for(asyncio.gather(*parties), 20)
            return result, dict(zip(nodes, outcomes))

    result, outcomes = asyncio.run(asyncio.wait_for(scenario(), 50))
    return result, "\n".join(events), outcomes


def gradient_descent(nodes: list[str], rounds: int, lr: float = 0.1) -> dict[str, float]:
    """Full-batch gradient descent of the mean squared error over the nodes' rows together,
    from zero weights, in float64: what FedSGD's rounds must come to."""
    rows = [row for node in nodes for row in DATA[node]]
    w1 = w2 = b = 0.0
    for _ in range(rounds):
        residuals = [(w1 * x1 + w2 * x2 + b - y, x1, x2) for x1, x2, y in rows]
        scale = 2.0 / len(rows)
        g1 = scale * sum(r * x1 for r, x1, _ in residuals)
        g2 = scale * sum(r * x2 for r, _, x2 in residuals)
        gb = scale * sum(r for r, _, _ in residuals)
        w1, w2, b = w1 - lr * g1, w2 - lr * g2, b - lr * gb
    return {"w1": w1, "w2": w2, "b": b}


@pytest.mark.parametrize("is_centralized", [True, False], ids=["initiator", "elected"])
def test_each_round_is_one_step_of_gradient_descent_on_everyones_data(
        tmp_path, is_centralized):
    result, events, outcomes = run_fedsgd(tmp_path, ["a", "b", "c"],
                                          is_centralized=is_centralized)

    expected = gradient_descent(["a", "b", "c"], rounds=3)
    assert {name: result.metrics[name] for name in expected} == pytest.approx(
        expected, rel=1e-6, abs=1e-7)
    assert gradient_descent(["c"], rounds=3) != pytest.approx(expected, rel=1e-3)  # needs all
    assert [row["samples"] for row in result.history] == [10, 10, 10]
    assert all(outcome.ok and outcome.rounds == 3 for outcome in outcomes.values()), outcomes
    assert "round 3/3: averaged 3 updates" in events


def test_a_loader_that_splits_the_data_fails_verification_before_round_1(tmp_path):
    result, events, outcomes = run_fedsgd(tmp_path, ["a", "b", "c"], batch_sizes={"b": 2})

    failure = ("b failed data verification: ConfigurationError: batch_size=2: FedSGD takes one "
               "step per round on this node's whole training set, but the loader gives its 3 "
               "samples in 2 batches; return DataLoader(dataset, batch_size=len(dataset)) from "
               "make_train_dataloader()")
    assert failure in events
    assert not outcomes["b"].ok
    assert outcomes["b"].reason.startswith("data verification failed: ConfigurationError: "
                                           "batch_size=2: FedSGD takes one step")
    assert outcomes["b"].rounds == 0  # it never trained: verification comes before any round
    trained = next(line for line in events.splitlines() if line.startswith("round 1: training"))
    assert sorted(trained.removeprefix("round 1: training on ").split(", ")) == ["a", "c"]
    assert [row["participants"] for row in result.history] == [2, 2, 2]
    # The others go on without it: gradient descent on their rows alone
    expected = gradient_descent(["a", "c"], rounds=3)
    assert {name: result.metrics[name] for name in expected} == pytest.approx(
        expected, rel=1e-6, abs=1e-7)


def test_more_than_one_epoch_a_round_is_refused():
    with pytest.raises(ConfigurationError, match="merge_epochs=2: FedSGD takes one gradient "
                                                 "step per round, so merge_epochs must be 1"):
        SgdTiny(min_clients=2, max_clients=3, merge_epochs=2)


def test_a_task_mixing_fedsgd_into_its_own_keeps_its_parameters():
    scheduler = SgdTiny(2, 3, learning_rate=0.5)

    assert scheduler.learning_rate == 0.5 and scheduler.merge_epochs == 1
    assert scheduler.hyperparameters() == {
        "min_clients": 2, "max_clients": 3, "max_rounds": 3, "learning_rate": 0.5,
        "batch_sizes": None}
