"""Privacy's cost on the digits task: DP's round overhead and accuracy, secure aggregation's round.

Round overhead: ``DifferentialPrivacy(FedAvg(), noise_multiplier=1, clip=1, sampling=1)``
beside plain FedAvg on the digits task's ConvNet with nothing to train (strategies.py's
``Echo``: each participant sends back the weights it got), N participants in this process
over a ``MemoryRelay``. A round's time is from one round's end to the next's, checkpoint
included; the strategies alternate across repetitions and each one's median round is set
beside FedAvg's, as a percentage. FedAvg run a second time, against itself, shows how much of
a difference is noise. Target: DP adds under 5 %. Then where DP's time goes, timed alone:
folding one update in (FedAvg's weighted sum against DP's clipped one) and the round's noise;
and what sampling=1 leaves out: the privacy accountant's own time per round (``record()``,
and ``stop_before()`` under a ``target_epsilon``) with sampling below 1, and the calibration
of the noise multiplier.

Accuracy: the digits task (the tutorial's ConvNet, DigitsScheduler's SGD and batch size)
for 20 rounds of 5 local epochs on an IID split of scikit-learn's digits
(``fedmagic.digits.write_partitions``) among 100 participants of about 14 training images
each: non-private FedAvg, and ``DifferentialPrivacy(FedAvg())`` with its noise multiplier
calibrated to spend epsilon 1, 3 or 8 (delta 1e-5) over the 20 rounds, at a few clip norms.
With 14 images an epoch is one SGD step: the demo's 2 epochs leave FedAvg still climbing at
round 20 (78 %), and DP charges its privacy by the round, not by the step.
Central DP adds noise of sd ``z * clip / (q * N)`` to each weight of the round's mean: with
strategies.py's 3 participants it would swamp any model, so this runs as many participants
as fit in a few minutes. Every run starts from the same weights and is tested by the initiator
on the same held-out set after every round (participants skip federated evaluation: a hundred
of them testing the same held-out digits every round would be most of the run).

As in strategies.py, every party runs in this process (``harness.run_in_memory``), each
participant training alone (``harness.TRAINING``) and seeded by its node and epoch count.
FedAvg's figures repeat but for the order updates arrive in, which the float32 sum sees in
its last bits (a figure may move by a point); DP's do not, since its draw and its noise come
from the operating system's randomness, as they must: each DP figure is one run, reported as
it came out. torch runs on one thread: participants train one at a time on batches of 14 images,
where more threads only contend.

Secure aggregation: a round of ``SecureAggregation(FedAvg())`` (SecAgg+: keys, shares, masked
uploads, unmasking, on top of FedAvg's round) beside plain FedAvg at N = 3, 10 and 50
participants in this process, alternated, median round, as for DP. Two rounds: the ConvNet with
nothing to train (``Echo``), where the difference is the protocol's cost alone, and the
tutorial's round: DigitsScheduler training the ConvNet for the demo's 2 local epochs on an IID
split of the digits among the N (the initiator tests the model each round; participants skip
federated evaluation, which would only lengthen both rounds alike). Target: a secure round at
most 2x FedAvg's at N = 10 on the tutorial model, judged on the round that trains; and the
added time growing no worse than n log n: from N = 10 to 50 the SecAgg+ default of
``2 ceil(log2 n) + 2`` neighbours gives ``n * degree`` a growth of 7.8, n log n's is 8.5, n^2's 25.
Every participant masks its update in this process, on its cores, so the added time here is the
whole federation's protocol work; deployed, each participant does its own part on its machine.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

if __name__ == "__main__":  # this tree's fedmagic, not a copy installed from an older wheel
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from harness import alternated, run_in_memory
from strategies import NodeDigits, StrategyMaker, round_seconds

from fedmagic.digits import Layout, write_partitions
from fedmagic.engine.policy import RoundPolicy
from fedmagic.examples.digits_task import ConvNet
from fedmagic.strategies import DifferentialPrivacy, FedAvg, SecureAggregation, Strategy
from fedmagic.strategies.secure import round_settings

#: The settings DP's round overhead is measured with: the brief's, every participant a round.
OVERHEAD_DP = {"noise_multiplier": 1.0, "clip": 1.0, "sampling": 1.0}
#: FedAvg timed a second time: its difference from FedAvg is the measurement's noise.
CONTROL = "FedAvg, again"
OVERHEAD: dict[str, StrategyMaker] = {
    "FedAvg": FedAvg,
    "DP(FedAvg)": functools.partial(DifferentialPrivacy, FedAvg(), **OVERHEAD_DP),
    CONTROL: FedAvg,
}
#: Target: DP adds at most this share to a round's wall time.
OVERHEAD_TARGET = 0.05

EPSILONS = (1.0, 3.0, 8.0)
DELTA = 1e-5
#: Each participant's chance to take part in a round: 0.5 halves the training a round costs,
#: and sampling's privacy amplification nearly makes up for the halved count (the noise on
#: the mean, z / q, is 3 to 16 % above sampling=1's at these epsilons).
SAMPLING = 0.5
#: Clip norms tried: an update's median L2 norm grows from about 0.3 in round 1 to about 1
#: by round 20, so one below that range, one inside it, one at its top.
CLIPS = (0.1, 0.3, 1.0)
EPOCHS = 5

SECURE = "SecAgg(FedAvg)"
SECURE_STRATEGIES: dict[str, StrategyMaker] = {
    "FedAvg": FedAvg,
    SECURE: functools.partial(SecureAggregation, FedAvg()),
    CONTROL: FedAvg,
}
#: Target: a secure round takes at most this many times FedAvg's, at this N, on a round that
#: trains the tutorial's model.
SECURE_TARGET, SECURE_TARGET_COUNT = 2.0, 10
#: The tutorial's local epochs a round: the demo's.
TUTORIAL_EPOCHS = 2


# -- round overhead --------------------------------------------------------------------------


def overhead_table(
    workdir: Path, counts: Sequence[int], repeats: int, rounds: int
) -> dict[int, float]:
    """Print the table; return DP's added milliseconds per participant, by N."""
    added_ms: dict[int, float] = {}
    settings = ", ".join(f"{name}={value:g}" for name, value in OVERHEAD_DP.items())
    print(
        f"round overhead: a round's wall time with the ConvNet and nothing to train (median of "
        f"{repeats} repetitions of {rounds} rounds, strategies alternated), and its difference "
        f"from FedAvg's; DP(FedAvg) is DifferentialPrivacy(FedAvg(), {settings})"
    )
    print(
        f"{'N':>3} {'strategy':<14} {'median round':>13} {'vs FedAvg':>10} {'per participant':>16}"
    )
    for count in counts:
        round_seconds(FedAvg, count, 2, workdir)  # a first run's imports and caches: not timed
        measure = functools.partial(round_seconds, count=count, rounds=rounds, workdir=workdir)
        times = alternated(OVERHEAD, repeats, measure)
        fedavg = statistics.median(times["FedAvg"])
        for label, seconds in times.items():
            median = statistics.median(seconds)
            added, each = median / fedavg - 1, (median - fedavg) / count * 1000
            if label == "FedAvg":
                print(f"{count:3d} {label:<14} {median * 1000:10.1f} ms")
                continue
            if label == CONTROL:
                verdict = "FedAvg against itself: the noise"
            else:
                added_ms[count] = each
                verdict = "under" if added < OVERHEAD_TARGET else "OVER"
                verdict += f" {OVERHEAD_TARGET:.0%}"
            print(
                f"{count:3d} {label:<14} {median * 1000:10.1f} ms {added:+10.1%} "
                f"{each:+13.3f} ms  {verdict}",
                flush=True,
            )
    return added_ms


def fold_lines(repeats: int = 2000) -> None:
    """Where DP's time in a round goes: folding each update in, and the round's noise."""
    reference = ConvNet().state_dict()
    update = {name: value + 0.01 * torch.randn_like(value) for name, value in reference.items()}
    private = DifferentialPrivacy(FedAvg(), **OVERHEAD_DP)
    private.begin(1, reference)
    folds = {"FedAvg": FedAvg().fold(reference), "DP(FedAvg)": private.fold(reference)}
    times: dict[str, list[float]] = {label: [] for label in folds}
    for _ in range(repeats):
        for label, fold in folds.items():
            started = time.perf_counter()
            fold.add(update, 1.0)
            times[label].append(time.perf_counter() - started)
    zeros = {name: torch.zeros_like(value) for name, value in reference.items()}
    steps = []
    for number in range(1, 101):
        private.begin(number, reference)
        started = time.perf_counter()
        private.next_state(number, reference, dict(zeros))
        steps.append(time.perf_counter() - started)
    plain, clipped = (statistics.median(times[label]) * 1e6 for label in folds)
    print(
        f"  folding one ConvNet update in (median of {repeats}): FedAvg's {plain:.0f} us, "
        f"DP's {clipped:.0f} us (the update minus the global model, its norm, the clip: "
        f"{clipped - plain:+.0f} us); DP's next_state(), noise on the sum and the accountant's "
        f"step: {statistics.median(steps) * 1000:.2f} ms a round"
    )


def accountant_ms(
    sampling: float, rounds: int, target_epsilon: float | None
) -> tuple[float, float, float]:
    """Seconds to build the strategy, and median milliseconds of its ``record()`` and of its
    ``stop_before()`` per round, over ``rounds`` rounds of a one-weight model."""
    started = time.perf_counter()
    if target_epsilon is None:
        strategy = DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, sampling=sampling)
    else:
        strategy = DifferentialPrivacy(
            FedAvg(), sampling=sampling, target_epsilon=target_epsilon, rounds=rounds
        )
    built = time.perf_counter() - started
    state = {"weight": torch.zeros(1)}
    record, stop = [], []
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        strategy.stop_before(number)
        stop.append(time.perf_counter() - started)
        strategy.begin(number, state)
        strategy.next_state(number, state, strategy.fold(state).combine())
        started = time.perf_counter()
        strategy.record(number)
        record.append(time.perf_counter() - started)
    return built, statistics.median(record) * 1000, statistics.median(stop) * 1000


def accountant_lines(rounds: int) -> None:
    print(
        "\nthe privacy accountant's own time, on the round loop's thread (median per round, "
        f"over {rounds} rounds): record() counts the epsilon spent, stop_before() the epsilon "
        "one more round would bring; sampling=1 above makes both nearly free"
    )
    for sampling, target in ((1.0, None), (SAMPLING, None), (1.0, 3.0), (SAMPLING, 3.0)):
        built, record, stop = accountant_ms(sampling, rounds, target)
        given = f"sampling={sampling:g}, " + (
            f"target_epsilon={target:g}" if target else "noise_multiplier=1"
        )
        print(
            f"  {given + ':':<37} record() {record:6.1f} ms, stop_before() {stop:6.1f} ms; "
            f"built in {built:.2f} s" + (", calibrating z" if target else ""),
            flush=True,
        )


# -- secure aggregation ----------------------------------------------------------------------


def tutorial_round_seconds(
    maker: StrategyMaker, layout: Layout, rounds: int, workdir: Path
) -> list[float]:
    """Seconds of each round but the first of the tutorial's task (the ConvNet trained for
    the demo's epochs) among ``layout``'s nodes, from one round's end to the next's."""
    ended: list[float] = []

    def on_event(text: str) -> None:
        if text.startswith("round ") and "averaged" in text:
            ended.append(time.perf_counter())

    count = len(layout.nodes)
    scheduler = NodeDigits(
        count, count, name="digits", max_rounds=rounds + 1, merge_epochs=TUTORIAL_EPOCHS
    )
    checkpoint = Path(tempfile.mkdtemp(dir=workdir, prefix="models-"))
    policy = RoundPolicy(join_grace=0, federated_evaluation=False)
    run_in_memory(scheduler, maker(), layout.initiator, layout.nodes, checkpoint, on_event, policy)
    return [later - earlier for earlier, later in itertools.pairwise(ended)]


def _n_log_n(count: int) -> float:
    return count * math.log(count)


def secure_table(
    workdir: Path, counts: Sequence[int], repeats: int, rounds: int, training_rounds: int
) -> None:
    """Print secure aggregation's round beside FedAvg's, its verdict on the target at N = 10,
    and how its added time grows with N."""
    print(
        f"\nsecure aggregation: a round's wall time under {SECURE}, SecureAggregation(FedAvg()) "
        f"with its defaults (degree: neighbours each node agrees keys with, t: the threshold), "
        f"beside FedAvg's, strategies alternated; nothing trained: the ConvNet with nothing to "
        f"train (median of {repeats} repetitions of {rounds} rounds), the protocol's cost "
        f"alone; tutorial: DigitsScheduler's ConvNet trained {TUTORIAL_EPOCHS} local epochs on "
        f"an IID split of the digits among the N (median of {repeats} repetitions of "
        f"{training_rounds} rounds); noise: FedAvg's second run minus its first"
    )
    print(
        f"{'N':>3} {'degree':>6} {'t':>3} {'round':<15} {'FedAvg':>10} {SECURE:>15} "
        f"{'secure / FedAvg':>16} {'added':>11} {'noise':>11}"
    )
    kinds = ("nothing trained", "tutorial")
    ratios: dict[str, dict[int, float]] = {kind: {} for kind in kinds}
    added: dict[str, dict[int, float]] = {kind: {} for kind in kinds}
    noise: dict[str, dict[int, float]] = {kind: {} for kind in kinds}
    for count in counts:
        parameters = round_settings(SecureAggregation(FedAvg()).describe(), count).parameters
        for maker in (FedAvg, SECURE_STRATEGIES[SECURE]):  # first runs' imports: not timed
            round_seconds(maker, count, 2, workdir)
        layout = write_partitions(workdir / f"tutorial-{count}", count, split="iid")
        measures = {
            "nothing trained": functools.partial(
                round_seconds, count=count, rounds=rounds, workdir=workdir
            ),
            "tutorial": functools.partial(
                tutorial_round_seconds, layout=layout, rounds=training_rounds, workdir=workdir
            ),
        }
        for kind, measure in measures.items():
            times = alternated(SECURE_STRATEGIES, repeats, measure)
            fedavg, secure, again = (
                statistics.median(times[label]) for label in ("FedAvg", SECURE, CONTROL)
            )
            ratios[kind][count] = secure / fedavg
            added[kind][count], noise[kind][count] = secure - fedavg, again - fedavg
            print(
                f"{count:3d} {parameters.degree:6d} {parameters.threshold:3d} {kind:<15} "
                f"{fedavg * 1000:7.1f} ms {secure * 1000:12.1f} ms {secure / fedavg:15.2f}x "
                f"{(secure - fedavg) * 1000:+8.1f} ms {(again - fedavg) * 1000:+8.1f} ms",
                flush=True,
            )
    if SECURE_TARGET_COUNT in counts:
        ratio = ratios["tutorial"][SECURE_TARGET_COUNT]
        verdict = "met" if ratio <= SECURE_TARGET else "NOT met"
        print(
            f"target, judged on the tutorial's round at N={SECURE_TARGET_COUNT}, which trains: "
            f"{SECURE} takes {ratio:.2f}x FedAvg's round, {verdict} (at most "
            f"{SECURE_TARGET:g}x); on a round that trains nothing, where FedAvg's is the "
            f"framework alone, {ratios['nothing trained'][SECURE_TARGET_COUNT]:.2f}x"
        )
    low, high = SECURE_TARGET_COUNT, max(counts)
    if low not in counts or high <= low:
        return
    n_log_n, squared = _n_log_n(high) / _n_log_n(low), (high / low) ** 2
    degree = {
        n: round_settings(SecureAggregation(FedAvg()).describe(), n).parameters.degree
        for n in (low, high)
    }
    pairwise = high * degree[high] / (low * degree[low])
    print(
        f"growth of the added time from N={low} to N={high}, against n log n's "
        f"x{n_log_n:.1f}, n^2's x{squared:.0f} and the protocol's n * degree's x{pairwise:.1f} "
        f"(judged on the round that trains nothing, the protocol's cost alone)"
    )
    for kind in kinds:
        first, last = added[kind][low], added[kind][high]
        shown = f"  {kind + ':':<16} {first * 1000:+7.1f} ms to {last * 1000:+7.1f} ms"
        # a ratio over a figure the size of the noise says nothing: twice it, at least
        if first <= 2 * abs(noise[kind][low]):
            print(
                f"{shown}: no growth from it, the added time at N={low} is within twice the "
                f"noise ({noise[kind][low] * 1000:+.1f} ms)",
                flush=True,
            )
            continue
        growth = last / first
        verdict = "no worse than n log n" if growth <= n_log_n else "WORSE than n log n"
        if growth > squared:
            verdict += ", and than n^2"
        print(f"{shown}, x{growth:.1f}: {verdict}", flush=True)


# -- accuracy --------------------------------------------------------------------------------


#: How the round loop says it refused an update for NaN or infinity: a diverged model.
NON_FINITE = "refused: non-finite values"


class _QuietNonFinite(logging.Filter):
    """Drops the log line of each update refused for non-finite values: once noise has
    diverged the model, every participant's says so every round. The table counts them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return NON_FINITE not in record.getMessage()


@dataclass
class Run:
    """One task's outcome: its strategy, history, and updates refused for NaN or infinity."""

    strategy: Strategy
    history: list[dict[str, Any]]
    refused: int

    @property
    def accuracies(self) -> list[float]:
        return [row["accuracy"] for row in self.history]


def train(layout: Layout, maker: StrategyMaker, rounds: int, workdir: Path) -> Run:
    """The digits task for ``rounds`` rounds under a strategy."""
    count = len(layout.nodes)
    scheduler = NodeDigits(
        count, count, name="digits", max_rounds=rounds, merge_epochs=EPOCHS, log_rounds=1
    )
    strategy, refused = maker(), []

    def on_event(text: str) -> None:
        if NON_FINITE in text:
            refused.append(text)

    checkpoint = Path(tempfile.mkdtemp(dir=workdir, prefix="models-"))
    policy = RoundPolicy(join_grace=0, federated_evaluation=False)
    result = run_in_memory(
        scheduler, strategy, layout.initiator, layout.nodes, checkpoint, on_event, policy
    )
    return Run(strategy, result.history, len(refused))


def accuracy_table(workdir: Path, participants: int, rounds: int, clips: Sequence[float]) -> float:
    """Print the table; return FedAvg's median round, in seconds, training included."""
    layout = write_partitions(workdir / "iid", participants, split="iid")
    sizes = sorted(node.train_size for node in layout.nodes)
    print(
        f"\naccuracy on the {layout.test_size} held-out digits: {participants} participants "
        f"(IID, {sizes[0]}-{sizes[-1]} training images each), {rounds} rounds of {EPOCHS} local "
        f"epochs (final: after the last round, best: any round's); DP: each participant drawn "
        f"with probability q={SAMPLING:g} a round, z calibrated to spend the target epsilon at "
        f"delta={DELTA:g} over the {rounds} rounds; sd: the noise on each weight of the mean, "
        f"z * clip / (q * N); spent: the epsilon the history recorded after the last round; "
        f"drawn: participants a round, on average; NaN: updates refused for NaN or infinity "
        f"(participants of a model the noise diverged)"
    )
    print(
        f"{'strategy':<10} {'target':>6} {'clip':>5} {'z':>6} {'sd':>7} {'final':>7} "
        f"{'best':>7} {'spent':>6} {'rounds':>6} {'drawn':>6} {'NaN':>5}"
    )
    plain = train(layout, FedAvg, rounds, workdir)
    fedavg = plain.accuracies[-1]
    print(
        f"{'FedAvg':<10} {'-':>6} {'-':>5} {'-':>6} {'-':>7} {fedavg:7.1%} "
        f"{max(plain.accuracies):7.1%} {'-':>6} {len(plain.history):6d} {participants:6d} "
        f"{plain.refused:5d}",
        flush=True,
    )
    best: dict[float, tuple[float, float]] = {}
    for epsilon in EPSILONS:
        for clip in clips:
            maker = functools.partial(
                DifferentialPrivacy,
                FedAvg(),
                clip=clip,
                sampling=SAMPLING,
                target_epsilon=epsilon,
                delta=DELTA,
                rounds=rounds,
            )
            run = train(layout, maker, rounds, workdir)
            z = run.strategy.describe()["noise_multiplier"]
            sd = z * clip / (SAMPLING * participants)
            final, spent = run.accuracies[-1], run.history[-1]["epsilon"]
            drawn = statistics.mean(row["drawn"] for row in run.history)
            print(
                f"{'DP(FedAvg)':<10} {epsilon:6g} {clip:5g} {z:6.2f} {sd:7.4f} {final:7.1%} "
                f"{max(run.accuracies):7.1%} {spent:6.3f} {len(run.history):6d} {drawn:6.1f} "
                f"{run.refused:5d}" + ("" if spent <= epsilon else "  OVER the target"),
                flush=True,
            )
            if final > best.get(epsilon, (-1.0, 0.0))[0]:
                best[epsilon] = (final, clip)
    print("the price of privacy: the best clip's final accuracy minus FedAvg's")
    for epsilon, (accuracy, clip) in best.items():
        print(
            f"  epsilon {epsilon:g}: {(accuracy - fedavg) * 100:+5.1f} points "
            f"({accuracy:.1%} at clip {clip:g}; FedAvg {fedavg:.1%})"
        )
    return statistics.median(row["seconds"] for row in plain.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 20 participants, 3 rounds, one clip, fewer repeats and rounds",
    )
    options = parser.parse_args()
    logging.getLogger("fedmagic").setLevel(logging.WARNING)
    logging.getLogger("fedmagic").addFilter(_QuietNonFinite())
    torch.set_num_threads(1)
    started = time.perf_counter()
    print(
        __doc__.splitlines()[0].rstrip(".") + (" (--quick: a smoke run)" if options.quick else "")
    )
    print(f"torch on 1 thread, {os.cpu_count()} CPUs\n")
    rounds = 3 if options.quick else 20
    with tempfile.TemporaryDirectory(prefix="fedmagic-privacy-") as temporary:
        workdir = Path(temporary)
        added_ms = overhead_table(
            workdir,
            counts=(10,) if options.quick else (10, 50),
            repeats=2 if options.quick else 9,
            rounds=3 if options.quick else 10,
        )
        fold_lines()
        accountant_lines(rounds)
        participants = 20 if options.quick else 100
        training_round = accuracy_table(
            workdir,
            participants=participants,
            rounds=rounds,
            clips=(0.3,) if options.quick else CLIPS,
        )
    # The same cost against a round that trains: the figure a task's author pays
    count, each = max(added_ms.items())
    added = each * participants / 1000
    share = added / training_round
    verdict = "under" if share < OVERHEAD_TARGET else "OVER"
    print(
        f"\nDP's cost against a round that trains: {each:+.3f} ms per participant (N={count} "
        f"above) x {participants} participants = {added * 1000:+.1f} ms, on FedAvg's median "
        f"round of {training_round:.2f} s with training (the accuracy table's): "
        f"{share:+.2%}, {verdict} {OVERHEAD_TARGET:.0%}"
    )
    with tempfile.TemporaryDirectory(prefix="fedmagic-secure-") as temporary:
        secure_table(
            Path(temporary),
            counts=(3, 10, 50),
            repeats=2 if options.quick else 3,
            rounds=3 if options.quick else 8,
            training_rounds=2 if options.quick else 4,
        )
    print(f"\nelapsed: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
