"""Differential privacy: clipping, the calibrated noise, Poisson sampling and the budget.

The arithmetic is checked against hand computations; the noise and the
sampling with statistical tests whose false failure rate is stated; the
accountant against Opacus's own RDP analysis; the round loop over the
in-memory relay, with the participants of test_rounds.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy import stats

from fedmagic.errors import ConfigurationError
from fedmagic.strategies import (
    DifferentialPrivacy,
    FedAdam,
    FedAvg,
    FedMedian,
    Krum,
    PrivateTraining,
    rebuild,
)
from fedmagic.strategies.privacy import PrivacyAccountant
from test_rounds import run_task, sends

#: Statistical tests below fail by chance at most this often.
FALSE_FAILURE = 1e-9
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's default alphas


def library_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    """Opacus's RDP analysis called directly: the sampled Gaussian mechanism, ``rounds`` times."""
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=ORDERS)
    epsilon, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(epsilon)


def started(privacy: DifferentialPrivacy, current: dict, population: list[str]) -> list[str]:
    """Begin a round as the round loop does: the draw, then the state it starts from."""
    drawn = privacy.sample(1, population, len(population))
    privacy.begin(1, current)
    return drawn


# -- clipping and the fixed denominator ---------------------------------------------------------

def test_each_update_is_clipped_to_norm_c_around_the_global_model_and_summed():
    privacy = DifferentialPrivacy(clip=1.0, noise_multiplier=1e-12)
    current = {"w": torch.tensor([1.0, 1.0]), "steps": torch.tensor(7)}
    fold = privacy.fold(current)
    started(privacy, current, ["a", "b"])

    fold.add({"w": torch.tensor([4.0, 5.0]), "steps": torch.tensor(9)}, 1.0)  # delta (3, 4): norm 5
    fold.add({"w": torch.tensor([1.3, 0.6]), "steps": torch.tensor(9)}, 1.0)  # (0.3, -0.4): 0.5
    total = fold.combine()

    # (3, 4) / 5 + (0.3, -0.4), by hand
    assert total["w"].tolist() == pytest.approx([0.6 + 0.3, 0.8 - 0.4], abs=1e-6)
    assert fold.norms == [] and fold.count == 0  # combine() starts the next round afresh
    assert "steps" not in total  # integer tensors are not part of the noised sum


def test_the_next_model_is_the_noised_sum_over_the_expected_count_not_the_count_that_came():
    privacy = DifferentialPrivacy(clip=10.0, sampling=0.5, noise_multiplier=1e-12)
    current = {"w": torch.tensor([2.0]), "steps": torch.tensor(7)}
    fold = privacy.fold(current)
    started(privacy, current, [f"n{i}" for i in range(8)])  # q N = 4 expected, whoever came

    fold.add({"w": torch.tensor([5.0]), "steps": torch.tensor(9)}, 1.0)
    fold.add({"w": torch.tensor([3.0]), "steps": torch.tensor(9)}, 1.0)
    new = privacy.next_state(1, current, fold.combine())

    assert new["w"].item() == pytest.approx(2.0 + (3.0 + 1.0) / 4, abs=1e-6)
    assert new["steps"].item() == 7  # the global model's counter, untouched


def test_the_noise_on_the_mean_has_standard_deviation_z_c_over_the_expected_count():
    z, clip, population, q = 1.3, 0.7, 10, 0.4
    privacy = DifferentialPrivacy(clip=clip, sampling=q, noise_multiplier=z)
    coordinates = 200_000
    current = {"w": torch.zeros(coordinates, dtype=torch.float64)}
    fold = privacy.fold(current)
    started(privacy, current, [f"n{i}" for i in range(population)])

    noise = privacy.next_state(1, current, fold.combine())["w"]  # nobody's update: noise alone

    sigma = z * clip / (q * population)
    # (n - 1) s² / sigma² is chi-squared with n - 1 degrees of freedom, and the mean is normal
    statistic = (coordinates - 1) * noise.var().item() / sigma**2
    low, high = stats.chi2.ppf([FALSE_FAILURE / 4, 1 - FALSE_FAILURE / 4], coordinates - 1)
    assert low < statistic < high, (noise.std().item(), sigma)
    bound = stats.norm.ppf(1 - FALSE_FAILURE / 4) * sigma / math.sqrt(coordinates)
    assert abs(noise.mean().item()) < bound


def test_each_participant_is_drawn_on_its_own_with_probability_q():
    q, population, draws = 0.3, 20, 2_000
    privacy = DifferentialPrivacy(sampling=q, noise_multiplier=1.0)

    counts = [len(privacy.sample(round, [f"n{i}" for i in range(population)], population))
              for round in range(draws)]

    # every draw is Binomial(20, 0.3): the total is Binomial(40 000, 0.3)
    low, high = stats.binom.ppf([FALSE_FAILURE / 2, 1 - FALSE_FAILURE / 2],
                                population * draws, q)
    assert low <= sum(counts) <= high
    assert 0 in counts or min(counts) < 3  # sizes vary from round to round: no fixed cohort
    assert privacy.record(1)["drawn"] == counts[-1]


# -- the accountant -----------------------------------------------------------------------------

@pytest.mark.parametrize("q, z, rounds, delta", [(1.0, 1.1, 10, 1e-5), (0.5, 0.8, 20, 1e-5),
                                                 (0.1, 1.5, 100, 1e-6)])
def test_the_accountants_epsilon_is_opacuss_own_for_the_same_q_z_rounds_and_delta(
        q, z, rounds, delta):
    accountant = PrivacyAccountant()
    for _ in range(rounds):
        accountant.step(z, q)

    assert accountant.epsilon(delta) == pytest.approx(library_epsilon(q, z, rounds, delta),
                                                      rel=1e-9)


def test_target_epsilon_with_rounds_calibrates_the_noise_to_spend_no_more_than_it():
    privacy = DifferentialPrivacy(sampling=0.5, target_epsilon=3.0, delta=1e-5, rounds=20)
    z = privacy.describe()["noise_multiplier"]

    assert library_epsilon(0.5, z, 20, 1e-5) <= 3.0
    assert library_epsilon(0.5, z, 20, 1e-5) > 2.9  # not far more noise than the budget needs
    assert privacy.describe()["strategy"] == FedAvg().describe()


# -- over the round loop ------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")  # z near 0: no privacy
def test_a_round_of_dp_fedavg_is_the_clipped_mean_over_the_expected_count(tmp_path):
    # Tiny starts at 0 (4 weights): a's update has norm 2, b's norm 8; both clip to 0.5 each
    privacy = DifferentialPrivacy(clip=1.0, sampling=1.0, noise_multiplier=1e-9)
    result, events, _ = run_task(tmp_path, {"a": sends(1.0), "b": sends(4.0)}, rounds=2,
                                 min_clients=2, strategy=privacy)

    # round 1: 0 + (0.5 + 0.5) / 2; round 2: each moves (1 - 0.5) or (4 - 0.5), clipped to 0.5
    assert result.metrics["w"] == pytest.approx(1.0, abs=1e-6)
    assert [row["drawn"] for row in result.history] == [2, 2]
    assert [row["epsilon"] for row in result.history] == pytest.approx(
        [library_epsilon(1.0, 1e-9, r, 1e-5) for r in (1, 2)])


def test_the_task_stops_before_the_round_that_would_pass_target_epsilon(tmp_path):
    z = 2.0
    target = (library_epsilon(1.0, z, 3, 1e-5) + library_epsilon(1.0, z, 4, 1e-5)) / 2
    privacy = DifferentialPrivacy(noise_multiplier=z, target_epsilon=target)
    result, events, _ = run_task(tmp_path, {"a": sends(1.0), "b": sends(2.0)}, rounds=10,
                                 min_clients=2, strategy=privacy)

    assert [row["round"] for row in result.history] == [1, 2, 3]
    assert result.history[-1]["epsilon"] <= target
    (stopped,) = [e for e in events if "stopped before round 4" in e]
    assert f"over target_epsilon={target:g} at delta=1e-05" in stopped, events
    assert (tmp_path / "models" / "rounds" / "report.json").is_file()  # it finished, not failed


def test_a_round_nobody_was_drawn_for_moves_the_model_by_noise_alone(tmp_path):
    privacy = DifferentialPrivacy(clip=1.0, sampling=1e-9, noise_multiplier=1.0)
    result, events, _ = run_task(tmp_path, {"a": sends(1.0), "b": sends(2.0)}, rounds=2,
                                 min_clients=2, strategy=privacy)

    assert [row["participants"] for row in result.history] == [0, 0]
    assert [row["drawn"] for row in result.history] == [0, 0]
    assert result.metrics["w"] != 0.0  # noise of sd 1 / 2e-9 on a model nobody trained


def test_a_resumed_task_keeps_counting_its_privacy_budget(tmp_path):
    privacy = DifferentialPrivacy(noise_multiplier=1.5)
    run_task(tmp_path, {"a": sends(1.0)}, rounds=2, strategy=privacy)
    saved = privacy.state_dict()

    again = DifferentialPrivacy(noise_multiplier=1.5)
    again.load_state_dict(saved)

    assert again.epsilon == pytest.approx(library_epsilon(1.0, 1.5, 2, 1e-5))


# -- what is refused ----------------------------------------------------------------------------

@pytest.mark.parametrize("build, message", [
    (lambda: DifferentialPrivacy(FedMedian(), noise_multiplier=1.0),
     "combines updates by a rule of its own"),
    (lambda: DifferentialPrivacy(Krum(), noise_multiplier=1.0), "wrap FedAvg"),
    (lambda: DifferentialPrivacy(), "noise_multiplier=None: say how much noise"),
    (lambda: DifferentialPrivacy(target_epsilon=3.0), "with rounds=... to calibrate"),
    (lambda: DifferentialPrivacy(noise_multiplier=1.0, clip=0), "clip=0: must be a positive"),
    (lambda: DifferentialPrivacy(noise_multiplier=1.0, sampling=0), "sampling=0"),
    (lambda: DifferentialPrivacy(noise_multiplier=1.0, sampling=1.5), "sampling=1.5"),
    (lambda: DifferentialPrivacy(target_epsilon=3.0, rounds=0), "rounds=0"),
    (lambda: DifferentialPrivacy(DifferentialPrivacy(noise_multiplier=1.0),
                                 noise_multiplier=1.0), "not another DifferentialPrivacy"),
])
def test_parameters_that_cannot_give_a_guarantee_are_refused(build, message):
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(
            ")", r"\)").replace(".", r"\.")):
        build()


def test_an_elected_aggregator_is_refused_since_it_would_see_the_updates_without_noise():
    privacy = DifferentialPrivacy(FedAdam(), noise_multiplier=1.0)

    with pytest.raises(ConfigurationError, match="use is_centralized=True"):
        rebuild(privacy.describe())


def test_what_consent_shows_names_the_wrapped_strategy_and_the_calibrated_noise():
    privacy = DifferentialPrivacy(FedAdam(eta=0.1), sampling=0.5, target_epsilon=8.0, rounds=10)

    shown = str(privacy)

    assert shown.startswith("DifferentialPrivacy(strategy=FedAdam(weighted=True")
    assert "eta=0.1" in shown and "sampling=0.5" in shown and "target_epsilon=8.0" in shown
    assert f"noise_multiplier={privacy.describe()['noise_multiplier']!r}" in shown


# -- what data owners and authors read ----------------------------------------------------------

def test_the_review_before_consent_states_the_guarantee_and_the_hash_covers_it():
    from fedmagic.engine.task import TaskPackage
    from tiny import Tiny

    def package(privacy):
        scheduler = Tiny(min_clients=1, max_clients=2, max_rounds=4)
        return TaskPackage.from_scheduler(scheduler, "dp", strategy=privacy.describe())

    planned = package(DifferentialPrivacy(sampling=0.5, target_epsilon=3.0, rounds=20))
    review = planned.review()

    (line,) = [line for line in review.splitlines() if line.startswith("# privacy: ")]
    assert "differential privacy: epsilon at most 3 at delta 1e-05" in line
    assert "clipped to L2 norm 1" in line and "drawn with probability 0.5" in line
    assert "added by the initiator" in line
    assert package(DifferentialPrivacy(sampling=0.5, target_epsilon=8.0, rounds=20)).code_hash \
        != planned.code_hash
    assert package(DifferentialPrivacy(noise_multiplier=1.0)).guarantees == [
        "differential privacy: epsilon grows every round, with no target, at delta 1e-05 "
        "(each update clipped to L2 norm 1, each participant drawn with probability 1 a round, "
        "Gaussian noise of 1 x 1 on the sum, added by the initiator)"]


def test_the_report_states_the_guarantee_and_the_epsilon_the_rounds_spent(tmp_path):
    privacy = DifferentialPrivacy(noise_multiplier=2.0, target_epsilon=50.0)
    result, _, _ = run_task(tmp_path, {"a": sends(1.0)}, rounds=3, strategy=privacy)

    markdown = (tmp_path / "models" / "rounds" / "report.md").read_text()
    spent = library_epsilon(1.0, 2.0, 3, 1e-5)
    assert "- Privacy: differential privacy: epsilon at most 50 at delta 1e-05" in markdown
    assert f"- Epsilon spent: {spent:.3g} at delta 1e-05, after round 3" in markdown
    assert "epsilon" not in result.metrics  # a round's bookkeeping, not what test() said


# -- DP-SGD on participants ---------------------------------------------------------------------

def private_run(tmp_path, monkeypatch, task, strategy, rounds: int = 2):
    """Run ``task`` with one real participant runtime in this process; result and outcome."""
    from fedmagic.engine.joining import start_join
    from fedmagic.engine.launch import start_task
    from fedmagic.wire.relay import EmbeddedRelay, Relay
    from test_rounds import TOKEN

    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    with EmbeddedRelay("127.0.0.1", 0, Relay()) as relay:
        node = start_join(relay.url, "private", TOKEN, "a", lambda package: True, wait=60,
                          quiet=True)
        run = start_task(task(min_clients=1, max_clients=1, max_rounds=rounds), "private",
                         relay=relay.url, token=TOKEN, join_timeout=60, join_grace=0.5,
                         strategy=strategy)
        try:
            result = run.wait(60)
        except Exception as failure:
            result = failure
        node.wait(30)
    return result, node


def test_each_participant_trains_with_dp_sgd_and_reports_the_epsilon_its_own_steps_spent(
        tmp_path, monkeypatch):
    from private_tiny import PrivateTiny

    strategy = PrivateTraining(FedAvg(), noise_multiplier=1.2, max_grad_norm=1.0)
    result, _ = private_run(tmp_path, monkeypatch, PrivateTiny, strategy, rounds=2)

    # 2 rounds of one epoch: 8 steps, each sampling 16 of 64 examples
    assert result.participants["a"].epsilon == pytest.approx(
        library_epsilon(0.25, 1.2, 8, 1e-5), rel=1e-9)
    report = json.loads((tmp_path / "models" / "private" / "report.json").read_text())
    assert report["participants"]["a"]["epsilon"] == result.participants["a"].epsilon


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")  # z near 0: no privacy
def test_dp_sgd_clips_each_examples_gradient_before_the_step(tmp_path, monkeypatch):
    from private_tiny import PrivateTiny

    # Without noise to speak of, 4 steps of lr 1 on gradients averaged from ones clipped to
    # 1e-3 move the 8 weights by at most 4e-3 in all
    strategy = PrivateTraining(FedAvg(), noise_multiplier=1e-9, max_grad_norm=1e-3)
    private, _ = private_run(tmp_path / "private", monkeypatch, PrivateTiny, strategy, rounds=1)
    plain, _ = private_run(tmp_path / "plain", monkeypatch, PrivateTiny, FedAvg(), rounds=1)
    torch.manual_seed(0)
    start = float(torch.cat([p.detach().flatten() for p in
                             torch.nn.Linear(3, 2).parameters()]).norm())

    assert abs(private.metrics["norm"] - start) <= 4e-3 + 1e-6
    assert abs(plain.metrics["norm"] - start) > 0.1  # the same training, unclipped, moves


@pytest.mark.parametrize("task, message", [
    ("WithBatchNorm", "has a model DP-SGD cannot train: .*BatchNorm"),
    ("WithoutOptimizer", "keeps no torch optimizer as self.optimizer"),
])
def test_a_participant_whose_task_cannot_train_privately_fails_verification_saying_why(
        tmp_path, monkeypatch, task, message):
    import private_tiny
    from conftest import wait_for
    from fedmagic.engine.joining import start_join
    from fedmagic.engine.launch import start_task
    from fedmagic.wire.relay import EmbeddedRelay, Relay
    from test_rounds import TOKEN

    monkeypatch.chdir(tmp_path)
    strategy = PrivateTraining(FedAvg(), noise_multiplier=1.0)
    with EmbeddedRelay("127.0.0.1", 0, Relay()) as relay:
        node = start_join(relay.url, "private", TOKEN, "a", lambda package: True, wait=60,
                          quiet=True)
        run = start_task(getattr(private_tiny, task)(min_clients=1, max_clients=1, max_rounds=1),
                         "private", relay=relay.url, token=TOKEN, join_timeout=120,
                         strategy=strategy)
        try:
            outcome = node.wait(120)  # its part ends as its verification fails
            assert wait_for(lambda: any("a failed data verification" in text
                                        for _, text in run.events), 30), run.events
        finally:
            run.stop(now=True)

    assert not outcome.ok and re.search(message, outcome.reason), outcome.reason
    (said,) = [text for _, text in run.events if "a failed data verification" in text]
    assert re.search(message, said), said


def test_dp_sgd_is_stated_before_consent_and_an_elected_aggregator_can_rebuild_it():
    from fedmagic.strategies.guarantees import guarantees

    strategy = PrivateTraining(FedAdam(eta=0.1), noise_multiplier=1.1, max_grad_norm=0.5)

    assert rebuild(strategy.describe()).describe() == strategy.describe()
    assert guarantees(strategy.describe()) == [
        "DP-SGD on every participant: each example's gradient clipped to L2 norm 0.5, "
        "Gaussian noise of 1.1 x 0.5 on each batch; each node counts its own epsilon at "
        "delta 1e-05, which grows with its rounds"]


def test_a_round_with_nobody_to_draw_from_releases_nothing_and_spends_nothing():
    privacy = DifferentialPrivacy(noise_multiplier=1.0)
    current = {"w": torch.tensor([0.5, -0.5])}
    fold = privacy.fold(current)
    assert started(privacy, current, []) == []  # every participant sits the round out

    new = privacy.next_state(1, current, fold.combine())

    assert new["w"].tolist() == [0.5, -0.5]
    assert privacy.epsilon == 0.0


def test_a_node_sitting_out_is_not_taken_back_early_into_a_poisson_draw(tmp_path):
    from test_rounds import never_trains

    privacy = DifferentialPrivacy(noise_multiplier=1.0)
    result, events, _ = run_task(tmp_path, {"a": never_trains}, rounds=2, strategy=privacy,
                                 calculation_timeout=0.5)

    assert not any("back early" in event for event in events), events
    assert [row["drawn"] for row in result.history] == [1, 0]  # round 2: a sits out
    assert result.history[1]["epsilon"] == result.history[0]["epsilon"]  # nothing released
