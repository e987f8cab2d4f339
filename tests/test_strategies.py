"""Strategies: each rule's arithmetic over three rounds against a float64 hand computation,
what the round loop asks of them, and what a task keeps of them.

The arithmetic tests drive a strategy as the round loop does (a fold per
task, reset each round; ``next_state`` after it); the hand computations are
plain Python floats, written from the papers' formulas, not from the code.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from fedmagic.engine.checkpoint import Checkpoint
from fedmagic.engine.launch import start_task
from fedmagic.engine.policy import RoundPolicy
from fedmagic.errors import AggregationError, ConfigurationError, TaskDefinitionError
from fedmagic.strategies import (
    BY_NAME,
    DifferentialPrivacy,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
    proximal_term,
    resolve,
)
from fedmagic.wire.relay import EmbeddedRelay, Relay
from test_rounds import TOKEN, participants_in_the_background, run_task, sends
from tiny import ProxTiny, ZeroTiny

# Three participants' local changes to a 3-coordinate model, per round: what training moved.
CHANGES = [
    [[0.5, -1.0, 2.0], [1.5, 0.0, -1.0], [-0.5, 2.0, 0.25]],
    [[0.1, 0.2, -0.3], [-0.4, 0.8, 0.6], [0.9, -0.7, 0.05]],
    [[-1.2, 0.3, 0.7], [0.2, -0.2, 0.4], [0.6, 1.1, -0.9]],
]
SAMPLES = [10, 30, 60]
START = [0.25, -0.5, 1.0]


def drive(strategy: Strategy, changes=CHANGES, samples=SAMPLES, start=START) -> list[list[float]]:
    """Run ``strategy`` over the rounds as the round loop does; the global state after each."""
    current = {"w": torch.tensor(start, dtype=torch.float32),
               "steps": torch.tensor(0, dtype=torch.int64)}
    fold = strategy.fold(current)
    states = []
    for number, round_changes in enumerate(changes, start=1):
        fold.reset()
        for change, count in zip(round_changes, samples):
            update = {"w": current["w"] + torch.tensor(change), "steps": current["steps"] + 5}
            fold.add(update, strategy.weight(count))
        current = {name: tensor.clone() for name, tensor in
                   strategy.next_state(number, current, fold.combine()).items()}
        states.append(current["w"].tolist())
        assert current["steps"].item() == 5 * number  # counters take the mean as it is
    return states


def weighted(values: list[list[float]], weights: list[float]) -> list[float]:
    return [sum(w * v[k] for v, w in zip(values, weights)) / sum(weights) for k in range(3)]


def hand_fedavg(weights: list[float]) -> list[list[float]]:
    x, states = list(START), []
    for round_changes in CHANGES:
        x = weighted([[a + d for a, d in zip(x, change)] for change in round_changes], weights)
        states.append(x)
    return states


def hand_fedopt(rule: str, eta: float, beta1: float, beta2: float, tau: float):
    """Reddi et al. 2021, Algorithm 2: m from 0, v from tau², no bias correction."""
    x, m, v, states = list(START), [0.0] * 3, [tau * tau] * 3, []
    for round_changes in CHANGES:
        delta = weighted(round_changes, SAMPLES)  # the mean model minus x
        for k in range(3):
            m[k] = beta1 * m[k] + (1 - beta1) * delta[k]
            squared = delta[k] ** 2
            if rule == "adagrad":
                v[k] = v[k] + squared
            elif rule == "adam":
                v[k] = beta2 * v[k] + (1 - beta2) * squared
            else:  # yogi
                v[k] = v[k] - (1 - beta2) * squared * math.copysign(1, v[k] - squared) \
                    if v[k] != squared else v[k]
            x[k] = x[k] + eta * m[k] / (math.sqrt(v[k]) + tau)
        states.append(list(x))
    return states


def close(got: list[list[float]], expected: list[list[float]]) -> None:
    assert len(got) == len(expected)
    for row, want in zip(got, expected):
        assert row == pytest.approx(want, rel=1e-5, abs=1e-6)


# -- the arithmetic, against the papers' formulas ----------------------------------------------

def test_fedavg_is_the_sample_weighted_mean_of_the_rounds_models():
    close(drive(FedAvg()), hand_fedavg(SAMPLES))


def test_unweighted_fedavg_is_the_plain_mean():
    close(drive(FedAvg(weighted=False)), hand_fedavg([1, 1, 1]))


def test_fedavgm_adds_server_momentum_to_the_mean_step():
    x, velocity, states = list(START), [0.0] * 3, []
    for round_changes in CHANGES:
        delta = weighted(round_changes, SAMPLES)
        velocity = [0.9 * v + d for v, d in zip(velocity, delta)]
        x = [a + 0.7 * v for a, v in zip(x, velocity)]
        states.append(x)

    close(drive(FedAvgM(server_lr=0.7, momentum=0.9)), states)


def test_fedavgm_without_momentum_at_server_lr_one_is_fedavg():
    close(drive(FedAvgM(server_lr=1.0, momentum=0.0)), hand_fedavg(SAMPLES))


@pytest.mark.parametrize("strategy, rule", [
    (FedAdam(eta=0.05, beta1=0.9, beta2=0.99, tau=1e-3), "adam"),
    (FedYogi(eta=0.05, beta1=0.9, beta2=0.99, tau=1e-3), "yogi"),
    (FedAdagrad(eta=0.05, beta1=0.9, tau=1e-3), "adagrad"),
], ids=["FedAdam", "FedYogi", "FedAdagrad"])
def test_adaptive_server_optimisers_follow_reddi_et_al_with_their_moments(strategy, rule):
    expected = hand_fedopt(rule, eta=0.05, beta1=0.9, beta2=0.99, tau=1e-3)

    close(drive(strategy), expected)
    # The moments themselves, after three rounds: m and v of the hand computation
    x, m, v = list(START), [0.0] * 3, [1e-6] * 3
    for round_changes in CHANGES:
        delta = weighted(round_changes, SAMPLES)
        for k in range(3):
            m[k] = 0.9 * m[k] + 0.1 * delta[k]
            sq = delta[k] ** 2
            v[k] = {"adam": 0.99 * v[k] + 0.01 * sq, "adagrad": v[k] + sq,
                    "yogi": v[k] - 0.01 * sq * math.copysign(1, v[k] - sq)}[rule]
    learned = strategy.state_dict()
    assert learned["m.w"].tolist() == pytest.approx(m, rel=1e-5)
    assert learned["v.w"].tolist() == pytest.approx(v, rel=1e-5)


def test_adaptive_defaults_are_the_papers():
    adam = FedAdam()
    assert (adam.eta, adam.beta1, adam.beta2, adam.tau) == (1e-2, 0.9, 0.99, 1e-3)
    assert FedYogi().describe() == {"name": "FedYogi", "weighted": True,
                                    "max_weight_share": None, "eta": 0.01, "beta1": 0.9,
                                    "tau": 0.001, "beta2": 0.99}
    assert "beta2" not in FedAdagrad().describe()


def test_median_and_trimmed_mean_take_each_coordinate_on_its_own():
    x, medians = list(START), []
    for round_changes in CHANGES:
        x = [statistics.median(x[k] + change[k] for change in round_changes) for k in range(3)]
        medians.append(x)

    close(drive(FedMedian()), medians)
    # Three updates with beta=0.34 drop one from each end: the median again
    close(drive(FedTrimmedAvg(beta=0.34)), medians)
    # and with beta=0.1, nothing is cut: the plain mean
    close(drive(FedTrimmedAvg(beta=0.1)), hand_fedavg([1, 1, 1]))


def five_updates_one_planted():
    honest = [[1.0, 1.0], [1.1, 0.9], [0.9, 1.2], [1.05, 1.0]]
    return [*honest, [50.0, -40.0]], honest


def krum_by_hand(updates: list[list[float]], f: int) -> list[float]:
    n = len(updates)
    scores = []
    for i, u in enumerate(updates):
        distances = sorted(sum((a - b) ** 2 for a, b in zip(u, v))
                           for j, v in enumerate(updates) if j != i)
        scores.append(sum(distances[: n - f - 2]))
    return scores


def test_krum_drops_a_planted_outlier_and_picks_the_update_closest_to_the_others():
    updates, honest = five_updates_one_planted()
    scores = krum_by_hand(updates, f=1)
    best = min(range(5), key=scores.__getitem__)
    fold = Krum(f=1).fold({"w": torch.zeros(2)})
    for update in updates:
        fold.add({"w": torch.tensor(update)}, 1.0)

    chosen = fold.combine()["w"].tolist()

    assert best != 4 and chosen == pytest.approx(updates[best])


def test_multi_krum_averages_the_best_scored_updates():
    updates, honest = five_updates_one_planted()
    scores = krum_by_hand(updates, f=1)
    best3 = sorted(range(5), key=scores.__getitem__)[:3]
    expected = [sum(updates[i][k] for i in best3) / 3 for k in range(2)]
    fold = MultiKrum(f=1, m=3).fold({"w": torch.zeros(2)})
    for update in updates:
        fold.add({"w": torch.tensor(update)}, 1.0)

    assert fold.combine()["w"].tolist() == pytest.approx(expected)
    # m=None keeps n - f: the four honest ones
    fold = MultiKrum(f=1).fold({"w": torch.zeros(2)})
    for update in updates:
        fold.add({"w": torch.tensor(update)}, 1.0)
    assert fold.combine()["w"].tolist() == pytest.approx(
        [sum(u[k] for u in honest) / 4 for k in range(2)])


def test_krum_over_three_rounds_never_takes_the_planted_update():
    changes = [[[0.1, 0.2, 0.0], [0.15, 0.1, 0.05], [0.05, 0.25, -0.05], [0.12, 0.18, 0.0],
                [90.0, -90.0, 90.0]]] * 3
    states = drive(Krum(f=1), changes=changes, samples=[1] * 5)

    assert all(abs(value) < 2 for state in states for value in state)


def test_krum_refuses_a_round_too_small_to_tell_f_arbitrary_updates_apart():
    with pytest.raises(ConfigurationError, match=r"min_clients=4: Krum\(f=1\) needs more than "
                       r"2f\+2=4 updates a round .* raise min_clients to 5, or lower f"):
        Krum(f=1).check(min_clients=4, max_clients=6)
    with pytest.raises(AggregationError, match="Krum with f=1 needs more than 2f"):
        fold = Krum(f=1).fold({"w": torch.zeros(1)})
        for value in (1.0, 2.0, 3.0):
            fold.add({"w": torch.tensor([value])}, 1.0)
        fold.combine()


# -- FedProx ------------------------------------------------------------------------------------

def test_the_proximal_term_is_zero_at_the_global_weights_and_grows_with_the_distance():
    model = torch.nn.Linear(3, 2)
    global_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    assert proximal_term(model, global_state, mu=0.5).item() == 0.0
    with torch.no_grad():
        model.weight.add_(0.1)
        model.bias.sub_(0.2)
    # mu/2 * (6 * 0.1² + 2 * 0.2²)
    assert proximal_term(model, global_state, mu=0.5).item() == pytest.approx(
        0.25 * (6 * 0.01 + 2 * 0.04), rel=1e-6)


def test_the_proximal_term_needs_the_models_own_parameter_names():
    model = torch.nn.Linear(3, 2)

    with pytest.raises(TaskDefinitionError, match="has no parameter named as in the task's "
                       "state_dict\\(\\).*return self.model.state_dict\\(\\)"):
        proximal_term(model, {"weights": torch.zeros(2, 3)}, mu=0.1)


def test_fedprox_tells_each_participant_mu_with_the_round_and_fedavg_tells_nothing():
    assert FedProx(mu=0.1).config(1, "a") == {"mu": 0.1}
    assert FedAvg().config(1, "a") == {}


@pytest.mark.parametrize("strategy, mu", [(FedAvg(), 0.0), (FedProx(mu=2.0), 2.0)], ids=str)
def test_a_participants_train_gets_mu_and_the_global_weights_for_its_proximal_term(
        tmp_path, monkeypatch, strategy, mu):
    # ProxTiny takes two steps of lr 0.1 on ||w - 1||² + proximal_term(), from w = 0:
    # w1 = 0.2 (the term has no gradient at the global weights), w2 = w1 - 0.1 (2 (w1 - 1) + mu w1)
    monkeypatch.chdir(tmp_path)
    from fedmagic.engine.joining import start_join
    with EmbeddedRelay("127.0.0.1", 0, Relay()) as relay:
        node = start_join(relay.url, "prox", TOKEN, "a", lambda package: True, wait=30,
                          quiet=True)
        run = start_task(ProxTiny(min_clients=1, max_clients=1, max_rounds=1), "prox",
                         relay=relay.url, token=TOKEN, join_timeout=60, strategy=strategy)
        result = run.wait(60)
        node.wait(30)

    w1 = 0.2
    assert result.metrics["w"] == pytest.approx(w1 - 0.1 * (2 * (w1 - 1) + mu * w1), rel=1e-5)


# -- over the round loop ------------------------------------------------------------------------

def test_the_round_loop_steps_fedadam_from_the_weighted_mean_of_its_participants(tmp_path):
    # Tiny starts at 0; every node sends the same weights each round: delta = value - x
    strategy = FedAdam(eta=0.1)
    result, events, _ = run_task(tmp_path, {"a": sends(1.0), "b": sends(4.0)}, rounds=3,
                                 samples={"a": 100, "b": 200}, min_clients=2, strategy=strategy)

    x, m, v = 0.0, 0.0, 1e-6
    for _ in range(3):
        delta = 3.0 - x
        m, v = 0.9 * m + 0.1 * delta, 0.99 * v + 0.01 * delta ** 2
        x += 0.1 * m / (math.sqrt(v) + 1e-3)
    assert result.metrics["w"] == pytest.approx(x, rel=1e-5)
    assert [row["samples"] for row in result.history] == [300, 300, 300]


def test_a_resumed_task_continues_its_server_optimiser(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = dict(token=TOKEN, join_timeout=10, join_grace=1, strategy=FedAdam(eta=0.1))
    with EmbeddedRelay("127.0.0.1", 0, Relay()) as relay:
        nodes = participants_in_the_background(relay.url, {"a": sends(2.0)})
        start_task(ZeroTiny(min_clients=1, max_clients=1, max_rounds=2), "rounds",
                   relay=relay.url, **options).wait(30)
        nodes.join(30)
        saved = Checkpoint(tmp_path / "models" / "rounds")
        assert (saved.directory / "strategy.pt").is_file()
        # Execute: one round more, from the checkpoint, with a fresh FedAdam of the same parameters
        nodes = participants_in_the_background(relay.url, {"a": sends(2.0)})
        resumed = start_task(ZeroTiny(min_clients=1, max_clients=1, max_rounds=3), "rounds",
                             relay=relay.url, resume=True, **{**options,
                                                             "strategy": FedAdam(eta=0.1)})
        result = resumed.wait(30)
        nodes.join(30)

    x, m, v = 0.0, 0.0, 1e-6  # three rounds in one go, by hand
    for _ in range(3):
        delta = 2.0 - x
        m, v = 0.9 * m + 0.1 * delta, 0.99 * v + 0.01 * delta ** 2
        x += 0.1 * m / (math.sqrt(v) + 1e-3)
    assert [row["round"] for row in result.history] == [1, 2, 3]
    assert result.metrics["w"] == pytest.approx(x, rel=1e-5)


def test_a_round_of_a_strategy_that_keeps_every_update_takes_only_what_fits_in_memory(tmp_path):
    nodes = {f"n{i}": sends(1.0 + i) for i in range(5)}

    result, events, _ = run_task(tmp_path, nodes, min_clients=3, strategy=FedMedian(),
                                 upload_memory=3 * 16)  # Tiny's update is 16 bytes

    assert [row["participants"] for row in result.history] == [3]
    assert any("FedMedian holds every update at once, and 5 updates of 16 bytes need 80 bytes, "
               "over upload_memory=48: this round takes 3 of them" in text for text in events)


def test_a_strategy_that_keeps_every_update_is_refused_when_min_clients_would_not_fit():
    with pytest.raises(ConfigurationError) as error:
        RoundPolicy(upload_memory=100 << 20).check_memory(Krum(f=1), 5, 30 << 20)

    assert str(error.value) == (
        "upload_memory=104857600: Krum holds every update of a round at once: min_clients=5 "
        "updates of 30.0 MiB need 150.0 MiB; raise upload_memory to 157286400 or more, or "
        "choose a strategy that folds updates as they arrive, such as FedAvg")
    RoundPolicy(upload_memory=100 << 20).check_memory(FedAdam(), 5, 30 << 20)  # it streams


# -- choosing one -------------------------------------------------------------------------------

def test_short_names_give_each_built_in_strategy_with_its_defaults():
    assert isinstance(resolve("FedProx"), FedProx)
    assert isinstance(resolve(None), FedAvg)
    assert set(BY_NAME) >= {"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
                            "median", "trimmed", "krum"}


@pytest.mark.parametrize("given, message", [
    ("fedsgd", "strategy='fedsgd': pass a strategy from fedmagic.strategies, e.g. "
               "strategy=FedAdam(eta=1e-2), or one of the names fedavg, fedprox"),
    (FedAdam, "strategy=<class 'fedmagic.strategies.fedopt.FedAdam'>: pass an instance: "
              "strategy=FedAdam()"),
])
def test_what_is_no_strategy_is_refused_naming_what_would_be(given, message):
    with pytest.raises(ConfigurationError) as error:
        resolve(given)

    assert str(error.value).startswith(message)


@pytest.mark.parametrize("build, message", [
    (lambda: FedAvg(max_weight_share=0), "max_weight_share=0: must be a share above 0 and at "
                                         "most 1"),
    (lambda: FedAvg(weighted="yes"), "weighted='yes': must be True or False"),
    (lambda: FedTrimmedAvg(beta=0.5), "beta=0.5: must be a number from 0 up to 0.5"),
    (lambda: FedAdam(eta=0), "eta=0: must be a positive number"),
    (lambda: FedYogi(beta2=1.0), "beta2=1.0: must be a number from 0 up to 1"),
    (lambda: FedProx(mu=-1), "mu=-1: must be a number from 0 up to inf"),
    (lambda: Krum(f=-1), "f=-1: must be a whole number, 0 or more"),
    (lambda: MultiKrum(m=0), "m=0: must be a whole number, at least 1, or None"),
])
def test_parameters_that_cannot_work_are_refused_when_the_strategy_is_made(build, message):
    with pytest.raises(ConfigurationError) as error:
        build()

    assert str(error.value).startswith(message)


def test_a_share_cap_no_round_of_min_clients_could_meet_is_refused():
    with pytest.raises(ConfigurationError, match=r"max_weight_share=0.4: cannot be met by a "
                       r"round of min_clients=2.*raise it to 0.5 or more"):
        FedAvg(max_weight_share=0.4).check(2, 3)


@pytest.mark.parametrize("old, new", [
    ({"aggregation": "median"}, "strategy=FedMedian() or strategy=FedTrimmedAvg(beta=...)"),
    ({"trim": 0.2}, "strategy=FedTrimmedAvg(beta=...)"),
    ({"weighted": False}, "strategy=FedAvg(weighted=False)"),
    ({"max_weight_share": 0.5}, "strategy=FedAvg(max_weight_share=...)"),
])
def test_the_options_that_became_strategies_are_refused_saying_the_new_spelling(old, new):
    with pytest.raises(ConfigurationError) as error:
        start_task(ZeroTiny(min_clients=1, max_clients=1, max_rounds=1), "old", **old)

    assert "how updates combine is now the task's strategy: pass " + new in str(error.value)


def test_the_strategy_and_its_parameters_are_part_of_the_code_hash_and_of_what_consent_shows():
    from fedmagic.engine.task import TaskPackage
    scheduler = ZeroTiny(min_clients=1, max_clients=1, max_rounds=1)
    scheduler._setup("hash")
    packages = [TaskPackage.from_scheduler(scheduler, "hash", strategy=strategy.describe())
                for strategy in (FedAvg(), FedProx(mu=0.01), FedProx(mu=0.1))]

    assert len({package.code_hash for package in packages}) == 3
    assert "# strategy: FedProx(weighted=True, max_weight_share=None, mu=0.1)" in \
        packages[2].review()
    again = TaskPackage.from_header(packages[2].to_header())
    assert again.strategy == {"name": "FedProx", "weighted": True, "max_weight_share": None,
                              "mu": 0.1}


# -- folds apart, merged: what a worker folding many participants sends ------------------------

@pytest.mark.parametrize("strategy", [
    FedAvg(), FedAvg(weighted=False), FedAdam(eta=0.1), FedMedian(), Krum(f=1),
    DifferentialPrivacy(clip=0.5, noise_multiplier=1e-9),
], ids=lambda strategy: type(strategy).__name__)
def test_folds_merged_from_their_partials_give_what_one_fold_of_every_update_gives(strategy):
    generator = torch.Generator().manual_seed(0)
    start = {"w": torch.zeros(3, 4), "steps": torch.tensor(7)}
    updates = [({"w": torch.randn(3, 4, generator=generator), "steps": torch.tensor(8 + i)},
                strategy.weight(10 * (i + 1))) for i in range(7)]
    strategy.begin(1, start)

    whole = strategy.fold(start)
    for state, weight in updates:
        whole.add(state, weight)
    merged = strategy.fold(start)
    for part in (updates[:2], updates[2:3], updates[3:]):  # three workers
        apart = strategy.fold(start)
        for state, weight in part:
            apart.add(state, weight)
        merged.merge(apart.partial())
        assert apart.count == 0  # a partial empties its fold, for the next round

    assert merged.count == whole.count == 7
    expected, got = whole.combine(), merged.combine()
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6)


def test_a_partial_of_other_tensors_is_refused():
    fold = FedAvg().fold({"w": torch.zeros(2)})
    other = FedAvg().fold({"w": torch.zeros(3)})
    other.add({"w": torch.ones(3)}, 1.0)

    with pytest.raises(AggregationError, match="partial sum's tensor 'w' has shape"):
        fold.merge(other.partial())
