"""Secure aggregation over the round loop: only the sum of the round's updates is revealed.

The initiator and real participant runtimes run in this process (``inprocess``),
over the in-memory relay and a websocket relay on 127.0.0.1; each node's training
leaves its weights at a value of its own, so each round's model is a hand
computation. Killing participant processes is in test_federation.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from fedmagic.engine.participant import ParticipantRuntime
from fedmagic.engine.rounds import TaskResult
from fedmagic.engine.task import TaskPackage
from fedmagic.errors import TaskFailed
from fedmagic.strategies import DifferentialPrivacy, FedAvg, SecureAggregation, Strategy
from fedmagic.strategies.secagg.keys import SEALED_BYTES
from fedmagic.wire.codec import StateReader
from fedmagic.wire.frames import Kind
from fedmagic.wire.messages import parse
from inprocess import run_over_relay
from secure_tiny import SAMPLES, VALUES, SecureTiny
from test_rounds import TOKEN

pytestmark = pytest.mark.timeout(60)

#: Every frame the initiator received in the last run: ``(sender, frame)``.
FRAMES_IN: list[tuple[str, Any]] = []


def run_secure(tmp_path, nodes: list[str], *, rounds: int = 1,
               strategy: Strategy | None = None, min_clients: int = 3,
               **options) -> tuple[TaskResult | TaskFailed, list[str], dict]:
    """Run SecureTiny under ``strategy`` (SecureAggregation() by default); the result (or
    the failure), the task's events and each node's outcome (see ``run_over_relay``).
    ``FRAMES_IN`` gets every frame the initiator received."""
    FRAMES_IN.clear()
    scheduler = SecureTiny(min_clients=min_clients, max_clients=len(nodes), max_rounds=rounds,
                           calculation_timeout=20)
    return run_over_relay(tmp_path, scheduler, nodes, strategy=strategy or SecureAggregation(),
                          frames=FRAMES_IN, **options)


def weighted_mean(nodes: list[str]) -> float:
    return sum(VALUES[n] * SAMPLES[n] for n in nodes) / sum(SAMPLES[n] for n in nodes)


@pytest.mark.parametrize("transport", ["memory", "websocket"])
def test_the_revealed_mean_is_the_weighted_mean_within_the_stated_quantisation_bound(
        tmp_path, transport):
    result, events, outcomes = run_secure(tmp_path, ["a", "b", "c", "d"], rounds=2,
                                          transport=transport)

    assert not isinstance(result, Exception), result
    row = result.history[-1]
    assert row["participants"] == 4 and row["threshold"] == 3
    assert abs(result.metrics["w"] - weighted_mean(["a", "b", "c", "d"])) <= row["error_bound"]
    assert all(outcome.ok and outcome.rounds == 2 for outcome in outcomes.values()), outcomes


def uploads_received(node: str, round: int = 1) -> list[dict[str, torch.Tensor]]:
    """The whole states the initiator received from ``node`` in ``round``."""
    states, reader = [], StateReader()
    for origin, frame in FRAMES_IN:
        if origin != node or frame.header.get("round") != round:
            continue
        if frame.kind == Kind.STATE:
            reader.feed(frame)
        elif frame.kind == Kind.STATE_END:
            states.append(reader.finish(frame))
            reader = StateReader()
    return states


@pytest.mark.parametrize("transport", ["memory", "websocket"])
def test_the_initiator_and_the_relay_hold_only_masked_words_and_sealed_shares(
        tmp_path, transport):
    # Over the websocket relay, FRAMES_IN are the very bytes the relay forwarded
    result, _, _ = run_secure(tmp_path, ["a", "b", "c", "d"], transport=transport)

    assert not isinstance(result, Exception), result
    for node in "abcd":
        (state,) = uploads_received(node)
        assert set(state) == {"masked"} and state["masked"].dtype == torch.uint32
        words = state["masked"].numpy().astype(np.float64)
        # Unmasked, every word would be a quantisation level below 2^16, and all of a
        # node's 1,024 alike (its weights are all the same value); masked, they are
        # uniform over 2^32: a level would show with probability 2^-16 per word
        assert np.count_nonzero(words < 2**16) <= 2
        assert len(np.unique(words)) > 1000
        assert stats.kstest(words / 2**32, "uniform").pvalue > 1e-6
    shares = [parse(frame) for origin, frame in FRAMES_IN if frame.kind == Kind.SECURE]
    sealed = [value for message in shares if message.stage == "share"
              for value in message.body["shares"].values()]
    assert len(sealed) == 4 * 3 and all(len(value) == SEALED_BYTES for value in sealed)


class DropsBeforeUploading(ParticipantRuntime):
    """Trains, shares its secrets and masks its update; then its connection ends instead
    of the upload."""

    async def _upload(self, round):
        await self._party.masked(self._scheduler.state_dict(), self._scheduler.global_state)
        await self.link.close()


class DropsAfterUploading(ParticipantRuntime):
    """Its connection ends straight after its masked update is sent, before it reveals."""

    async def _upload(self, round):
        await super()._upload(round)
        await self.link.close()


def test_a_node_that_drops_before_uploading_is_left_out_and_its_masks_taken_off(tmp_path):
    result, events, _ = run_secure(tmp_path, ["a", "b", "c", "d", "e"],
                                   runtimes={"c": DropsBeforeUploading})

    assert not isinstance(result, Exception), result
    assert result.history[0]["participants"] == 4
    assert abs(result.metrics["w"] - weighted_mean(["a", "b", "d", "e"])) \
        <= result.history[0]["error_bound"]
    assert "revealed without c, which left before uploading its masked update" \
        in "\n".join(events)


def test_a_node_that_drops_after_uploading_is_in_the_sum(tmp_path):
    result, events, _ = run_secure(tmp_path, ["a", "b", "c", "d", "e"],
                                   runtimes={"c": DropsAfterUploading})

    assert not isinstance(result, Exception), result
    assert result.history[0]["participants"] == 5
    assert abs(result.metrics["w"] - weighted_mean(["a", "b", "c", "d", "e"])) \
        <= result.history[0]["error_bound"]


def test_fewer_than_t_uploads_fail_the_round_naming_t_and_who_dropped(tmp_path):
    result, _, _ = run_secure(tmp_path, ["a", "b", "c", "d", "e"], runtimes=dict.fromkeys(
        "ade", DropsBeforeUploading))

    assert isinstance(result, TaskFailed)
    assert result.round == 1
    assert "fewer than the threshold t=3" in str(result)
    for node in "ade":
        assert f"'{node}' (before uploading its masked update)" in str(result)


class FlipsABitOfAShare(ParticipantRuntime):
    """Seals its shares, then flips a bit of the one for 'a' on the way out."""

    async def _send_secure(self, frame):
        if frame.kind == Kind.SECURE and frame.header["stage"] == "share":
            sealed = bytearray(frame.header["body"]["shares"]["a"])
            sealed[-1] ^= 1
            frame.header["body"]["shares"]["a"] = bytes(sealed)
        await super()._send_secure(frame)


def test_a_share_altered_on_its_way_is_refused_and_the_round_goes_on_without_its_recipient(
        tmp_path):
    result, events, _ = run_secure(tmp_path, ["a", "b", "c", "d", "e"],
                                   runtimes={"e": FlipsABitOfAShare})

    assert not isinstance(result, Exception), result
    log = "\n".join(events)
    assert "a refused: gave up on the secure round: protocol error with e: the share it " \
           "sent 'a' does not authenticate for this round: it was altered" in log
    assert abs(result.metrics["w"] - weighted_mean(["b", "c", "d", "e"])) \
        <= result.history[0]["error_bound"]


class SealsForAStranger(ParticipantRuntime):
    """Addresses a share to a node that is not its neighbour in the round."""

    async def _send_secure(self, frame):
        if frame.kind == Kind.SECURE and frame.header["stage"] == "share":
            frame.header["body"]["shares"]["mallory"] = bytes(SEALED_BYTES)
        await super()._send_secure(frame)


def test_a_node_that_seals_shares_for_others_than_its_neighbours_is_refused(tmp_path):
    result, events, _ = run_secure(tmp_path, ["a", "b", "c", "d", "e"],
                                   runtimes={"b": SealsForAStranger})

    assert not isinstance(result, Exception), result
    assert "b refused: sealed shares for 'a', 'c', 'd', 'e', 'mallory', but must seal one " \
           "for each neighbour" in "\n".join(events)
    assert abs(result.metrics["w"] - weighted_mean(["a", "c", "d", "e"])) \
        <= result.history[0]["error_bound"]


class UploadsAShortVector(ParticipantRuntime):
    """Masks its update as asked, then leaves the last word out of the upload."""

    def __init__(self, link, *args, **kwargs):
        super().__init__(link, *args, **kwargs)
        send_state = link.send_state

        async def short(state, **fields):
            await send_state({"masked": state["masked"][:-1]}, **fields)

        link.send_state = short


def test_a_masked_upload_of_the_wrong_length_is_refused_and_its_masks_taken_off(tmp_path):
    result, events, _ = run_secure(tmp_path, ["a", "b", "c", "d", "e"],
                                   runtimes={"d": UploadsAShortVector})

    assert not isinstance(result, Exception), result
    assert "d refused: its masked update is not 1024 words of 32 bits" in "\n".join(events)
    assert abs(result.metrics["w"] - weighted_mean(["a", "b", "c", "e"])) \
        <= result.history[0]["error_bound"]


def test_a_participant_never_sends_in_the_clear_an_update_it_consented_to_mask(tmp_path):
    # The initiator runs plain FedAvg, though the code it sent says SecureAggregation
    result, _, _ = run_secure(tmp_path, ["a", "b", "c"], strategy=FedAvg(),
                              consented=SecureAggregation(), upload_timeout=2)

    assert isinstance(result, TaskFailed)
    assert not [frame for _, frame in FRAMES_IN if frame.kind == Kind.STATE_END]


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
def test_distributed_dp_noise_on_the_revealed_mean_has_the_calibrated_deviation(tmp_path):
    z, clip, nodes = 1.0, 0.5, ["a", "b", "c", "d", "e"]
    strategy = SecureAggregation(DifferentialPrivacy(clip=clip, noise_multiplier=z))
    result, _, _ = run_secure(tmp_path, nodes, strategy=strategy)

    assert not isinstance(result, Exception), result
    t = result.history[0]["threshold"]
    model = torch.load(tmp_path / "models" / "inprocess" / "model.pt", weights_only=True)
    weights = model["weight"].double().reshape(-1).numpy()
    # Each node's update (every weight at its value, norm 32 * value) is clipped to norm
    # 0.5, so 0.5 / 32 per weight; each adds noise of z C / sqrt(t); the mean is the sum
    # over q N = 5
    expected = 5 * (clip / 32) / 5
    sd = np.sqrt(5) * (z * clip / np.sqrt(t)) / 5
    residuals = weights - expected
    # Two-sided tests, each failing a correct implementation with probability 1e-6
    assert abs(residuals.mean()) < stats.norm.isf(5e-7) * sd / np.sqrt(residuals.size)
    chi2 = np.sum(residuals ** 2) / sd ** 2
    assert stats.chi2.ppf(5e-7, residuals.size) < chi2 < stats.chi2.isf(5e-7, residuals.size)
    assert result.history[0]["epsilon"] > 0


# -- what data owners and authors read, and what is refused at launch ------------------------

def test_the_review_before_consent_states_secure_aggregation_and_the_hash_covers_it():
    def package(strategy):
        scheduler = SecureTiny(min_clients=3, max_clients=5, max_rounds=2)
        return TaskPackage.from_scheduler(scheduler, "secure", strategy=strategy.describe())

    planned = package(SecureAggregation(DifferentialPrivacy(clip=0.5, noise_multiplier=1.0)))
    lines = [line for line in planned.review().splitlines() if line.startswith("# privacy: ")]

    assert lines[0].startswith("# privacy: secure aggregation (SecAgg+): the initiator and "
                               "the relay see each round's sum of the updates, never one")
    assert lines[1].endswith("added by the participants before masking, each its share "
                             "(distributed))")
    assert package(SecureAggregation(threshold=3)).code_hash \
        != package(SecureAggregation()).code_hash
    assert package(SecureAggregation(bits=12)).code_hash != package(SecureAggregation()).code_hash


@pytest.mark.parametrize("options, message", [
    ({"min_clients": 2}, "secure aggregation needs at least 3 participants a round"),
    ({"is_centralized": False}, "with is_centralized=False the elected participant would "
                                "receive the updates instead"),
    ({"strategy": SecureAggregation(threshold=2), "max_clients": 8},
     "threshold=2: must be above half of the degree + 1 = 4 nodes"),
])
def test_a_secure_task_that_cannot_work_is_refused_at_launch(options, message):
    from fedmagic.engine.launch import start_task
    from fedmagic.errors import ConfigurationError

    strategy = options.pop("strategy", SecureAggregation())
    scheduler = SecureTiny(**{"min_clients": 3, "max_clients": 5, "max_rounds": 1, **options})
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        start_task(scheduler, "refused", relay="ws://127.0.0.1:9", token=TOKEN,
                   strategy=strategy)
