"""Secure aggregation (SecAgg+): the aggregator learns the sum of the updates and nothing else.

Rounds are driven here as the round loop will drive them over the relay:
each stage's messages go from the participants to the server and back,
with some participants dropping on the way. Sums are checked against the
clipped updates summed by hand in float64, within the stated quantisation
bound; what the server holds of one participant is checked with
statistical tests whose false failure rate is stated.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from fedmagic.errors import ConfigurationError, ProtocolError, SecureAggregationError
from fedmagic.strategies.secagg import (
    SecAggClient,
    SecAggParameters,
    SecAggServer,
    SecureSum,
    dequantise,
    expand,
    flatten,
    neighbours,
    open_share,
    quantise,
    seal_share,
    unmask_sum,
)
from fedmagic.strategies.secagg.shamir import combine, split

#: Statistical tests below fail by chance at most this often.
FALSE_FAILURE = 1e-9


def updates_of(nodes: list[str], shape: tuple[int, ...] = (4, 5)) -> dict[str, dict]:
    """Each node's weighted update; some coordinates beyond clip=1, so clipping shows."""
    return {
        node: {"weight": torch.randn(shape) * 0.8, "bias": torch.randn(shape[-1]) * 0.8}
        for node in nodes
    }


def clipped_sum(updates: dict[str, dict], nodes, clip: float = 1.0) -> dict[str, torch.Tensor]:
    """The sum a trusted aggregator would compute, by hand, in float64."""
    names = next(iter(updates.values()))
    return {
        name: sum(updates[node][name].double().clamp(-clip, clip) for node in nodes)
        for name in names
    }


def largest_error(total: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    return max(float((total[name] - exact[name]).abs().max()) for name in exact)


@dataclass
class Round:
    parameters: SecAggParameters
    nonce: bytes
    clients: dict[str, SecAggClient]
    server: SecAggServer
    masked: dict[str, dict] | None = None
    result: SecureSum | None = None


def wire(messages: dict[str, dict]) -> dict[str, dict]:
    """Messages as they arrive over the relay: through msgpack, with no pickle."""
    return msgpack.unpackb(msgpack.packb(messages), raw=False, strict_map_key=True)


def start(updates: dict[str, dict], parameters: SecAggParameters) -> Round:
    nodes = sorted(updates)
    nonce = secrets.token_bytes(32)
    template = {name: torch.zeros_like(value) for name, value in updates[nodes[0]].items()}
    return Round(
        parameters,
        nonce,
        {node: SecAggClient(node, nodes, parameters, nonce) for node in nodes},
        SecAggServer(nodes, parameters, nonce, template),
    )


def shared(round: Round, drop_before_sharing=()) -> dict[str, dict]:
    """Stages 1 and 2: keys advertised and routed, shares sealed and routed."""
    clients, server = round.clients, round.server
    keys = server.route_keys(wire({node: client.advertise() for node, client in clients.items()}))
    sealed = {
        node: clients[node].share(**message)
        for node, message in wire(keys).items()
        if node not in drop_before_sharing
    }
    return wire(server.route_shares(wire(sealed)))


def secure_round(
    updates: dict[str, dict],
    parameters: SecAggParameters,
    *,
    drop_before_sharing=(),
    drop_before_masking=(),
    drop_before_unmasking=(),
) -> Round:
    """A whole round, every message through msgpack, with participants dropping before the
    stages named."""
    round = start(updates, parameters)
    clients, server = round.clients, round.server
    shares = shared(round, drop_before_sharing)
    round.masked = wire(
        {
            node: clients[node].mask(updates[node], **message)
            for node, message in shares.items()
            if node not in drop_before_masking
        }
    )
    requests = wire(server.request_unmasking(round.masked))
    reveals = {
        node: clients[node].unmask(**message)
        for node, message in requests.items()
        if node not in drop_before_unmasking
    }
    round.result = server.finish(wire(reveals))
    return round


# -- the sum -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "participants, degree", [(3, None), (5, None), (10, 4)], ids=["n=3", "n=5", "n=10,k=4"]
)
def test_the_unmasked_sum_is_the_sum_of_the_clipped_updates_within_the_quantisation_bound(
    participants, degree
):
    nodes = [f"node-{i}" for i in range(participants)]
    updates = updates_of(nodes)
    parameters = SecAggParameters(participants, degree=degree)

    result = secure_round(updates, parameters).result

    assert result is not None
    assert result.nodes == tuple(sorted(nodes))
    assert largest_error(result.total, clipped_sum(updates, nodes)) <= result.error_bound
    assert result.error_bound == pytest.approx(participants * 2 / (2**16 - 1))
    assert {name: tensor.shape for name, tensor in result.total.items()} == {
        "weight": (4, 5),
        "bias": (5,),
    }


def test_a_sparse_graph_gives_each_node_degree_neighbours_placed_by_the_round_nonce():
    nodes = [f"node-{i}" for i in range(10)]

    graph = neighbours(nodes, 4, b"a" * 32)
    other = neighbours(nodes, 4, b"b" * 32)

    assert all(len(graph[node]) == 4 and node not in graph[node] for node in nodes)
    assert all(node in graph[peer] for node in nodes for peer in graph[node])  # symmetric
    assert graph != other  # another nonce, another ring
    assert neighbours(nodes, 9, b"a" * 32)["node-0"] == frozenset(nodes) - {"node-0"}


def test_stochastic_rounding_is_unbiased():
    parameters = SecAggParameters(3, bits=4)  # a step of 2/15, so rounding shows
    value = 0.3  # between two levels: rounds to either, up as often as its place says
    coordinates = 200_000
    level = (value + 1) / parameters.step
    fraction = level - np.floor(level)
    below, above = value - fraction * parameters.step, value + (1 - fraction) * parameters.step

    rounded = dequantise(quantise(np.full(coordinates, value), parameters), 1, parameters)

    assert np.isclose(rounded, below).sum() + np.isclose(rounded, above).sum() == coordinates
    spread = parameters.step * np.sqrt(fraction * (1 - fraction) / coordinates)
    assert abs(rounded.mean() - value) <= stats.norm.isf(FALSE_FAILURE / 2) * spread
    assert np.abs(rounded - value).max() < parameters.step


# -- what the server holds of one participant ----------------------------------------------------


def test_a_masked_vector_looks_uniform_and_is_uncorrelated_with_its_update():
    nodes = [f"node-{i}" for i in range(5)]
    updates = updates_of(nodes, shape=(200, 100))
    round = secure_round(updates, SecAggParameters(5))
    assert round.masked is not None

    masked = np.frombuffer(round.masked["node-2"]["masked"], dtype="<u4").astype(np.float64)
    update = flatten(updates["node-2"])

    # uniform over [0, 2^32): Kolmogorov-Smirnov
    assert stats.kstest(masked / 2**32, "uniform").pvalue > FALSE_FAILURE
    # no linear trace of the update: |r| below what chance gives once in 1e9
    r = np.corrcoef(masked, update)[0, 1]
    assert abs(r) < stats.norm.isf(FALSE_FAILURE / 2) / np.sqrt(update.size)


def test_no_strict_subset_of_masked_vectors_unmasks_even_given_their_self_mask_seeds():
    nodes = [f"node-{i}" for i in range(5)]
    updates = updates_of(nodes, shape=(200, 100))
    parameters = SecAggParameters(5)
    round = secure_round(updates, parameters)
    assert round.masked is not None
    word = parameters.word

    for subset in (["node-1"], ["node-0", "node-3"], ["node-0", "node-1", "node-2", "node-4"]):
        total = np.zeros(20_100, dtype=word)
        for node in subset:
            total += np.frombuffer(round.masked[node]["masked"], dtype=word)
            # more than the server ever learns of a survivor: its self-mask seed
            total -= expand(round.clients[node]._seed, total.size, word)

        # the pairwise masks towards the rest stay: a uniform vector, not the subset's sum
        assert stats.kstest(total / 2**32, "uniform").pvalue > FALSE_FAILURE
        guess = dequantise(total, len(subset), parameters)
        exact = flatten(clipped_sum(updates, subset))
        assert np.abs(guess - exact).max() > 1000 * len(subset) * parameters.step


def test_unmasking_refuses_a_subset_whose_partners_neither_survived_nor_dropped():
    nodes = [f"node-{i}" for i in range(5)]
    updates = updates_of(nodes)
    parameters = SecAggParameters(5)
    round = secure_round(updates, parameters)
    assert round.masked is not None
    one = {"node-1": np.frombuffer(round.masked["node-1"]["masked"], dtype=parameters.word)}
    everyone_else = {"node-1": frozenset(nodes) - {"node-1"}}

    with pytest.raises(
        SecureAggregationError,
        match="masked with 'node-1', yet neither uploaded nor had its mask key rebuilt",
    ):
        unmask_sum(
            one["node-1"],
            ["node-1"],
            {"node-1": round.clients["node-1"]._seed},
            {},
            everyone_else,
            {},
            parameters,
            round.nonce,
        )


# -- dropouts ------------------------------------------------------------------------------------


def test_a_participant_that_drops_after_uploading_is_in_the_sum():
    nodes = [f"node-{i}" for i in range(5)]
    updates = updates_of(nodes)

    round = secure_round(updates, SecAggParameters(5), drop_before_unmasking=["node-3"])

    assert round.result is not None
    assert "node-3" in round.result.nodes  # its self mask came off from its neighbours' shares
    exact = clipped_sum(updates, nodes)
    assert largest_error(round.result.total, exact) <= round.result.error_bound
    assert "update is in the sum" in round.server.dropped["node-3"]


def test_a_participant_that_drops_before_uploading_is_left_out_and_its_masks_removed():
    nodes = [f"node-{i}" for i in range(5)]
    updates = updates_of(nodes)

    round = secure_round(updates, SecAggParameters(5), drop_before_masking=["node-3"])

    assert round.result is not None
    survivors = [node for node in nodes if node != "node-3"]
    assert round.result.nodes == tuple(survivors)
    exact = clipped_sum(updates, survivors)  # the survivors' masks towards it, rebuilt and removed
    assert largest_error(round.result.total, exact) <= round.result.error_bound
    assert round.server.dropped == {"node-3": "before uploading its masked update"}


def test_a_sparse_round_survives_a_drop_at_every_stage():
    nodes = [f"node-{i}" for i in range(10)]
    updates = updates_of(nodes)
    parameters = SecAggParameters(10, degree=6)  # 7 hold each secret, t = 4

    round = secure_round(
        updates,
        parameters,
        drop_before_sharing=["node-1"],
        drop_before_masking=["node-4"],
        drop_before_unmasking=["node-7"],
    )

    assert round.result is not None
    in_sum = [node for node in nodes if node not in ("node-1", "node-4")]
    assert round.result.nodes == tuple(in_sum)
    assert largest_error(round.result.total, clipped_sum(updates, in_sum)) <= (
        round.result.error_bound
    )


def test_fewer_than_t_uploads_fail_naming_t_and_who_dropped():
    nodes = [f"node-{i}" for i in range(5)]
    updates = updates_of(nodes)
    round = start(updates, SecAggParameters(5))  # t = 3
    shares = shared(round)
    masked = {
        node: round.clients[node].mask(updates[node], **shares[node])
        for node in ("node-0", "node-2")
    }

    with pytest.raises(SecureAggregationError) as refused:
        round.server.request_unmasking(masked)

    message = str(refused.value)
    assert message.startswith(
        "secure aggregation failed at the aggregator: only 2 masked updates arrived, fewer "
        "than the threshold t=3"
    )
    for node in ("node-1", "node-3", "node-4"):
        assert f"{node!r} (before uploading its masked update)" in message
    with pytest.raises(
        SecureAggregationError,
        match=r"^secure aggregation failed at node-0: 2 masked updates arrived, fewer than the "
        r"threshold t=3.*'node-4'",
    ):
        round.clients["node-0"].unmask(
            survivors=["node-0", "node-2"], dropped=["node-1", "node-3", "node-4"]
        )


# -- sealed shares -------------------------------------------------------------------------------


def test_a_share_with_a_flipped_bit_is_refused_naming_sender_and_recipient():
    nodes = [f"node-{i}" for i in range(3)]
    updates = updates_of(nodes)
    round = start(updates, SecAggParameters(3))
    shares = shared(round)
    sealed = bytearray(shares["node-1"]["shares"]["node-0"])
    sealed[40] ^= 0x01
    shares["node-1"]["shares"]["node-0"] = bytes(sealed)

    with pytest.raises(ProtocolError) as refused:
        round.clients["node-1"].mask(updates["node-1"], **shares["node-1"])

    assert str(refused.value) == (
        "protocol error with node-0: the share it sent 'node-1' does not authenticate for "
        "this round: it was altered, sealed for another node, or replayed from another round"
    )


def test_a_share_sealed_for_another_node_is_refused():
    nodes = [f"node-{i}" for i in range(3)]
    updates = updates_of(nodes)
    round = start(updates, SecAggParameters(3))
    shares = shared(round)
    # node-0's share for node-2, handed to node-1 as if node-0 had sealed it for node-1
    shares["node-1"]["shares"]["node-0"] = shares["node-2"]["shares"]["node-0"]

    with pytest.raises(ProtocolError, match="with node-0: the share it sent 'node-1' does not"):
        round.clients["node-1"].mask(updates["node-1"], **shares["node-1"])


def test_a_share_replayed_in_another_round_is_refused():
    sender, recipient = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    sender_public = sender.public_key().public_bytes_raw()
    recipient_public = recipient.public_key().public_bytes_raw()
    first, second = b"1" * 32, b"2" * 32
    sealed = seal_share(sender, recipient_public, "a", "b", first, b"share")
    assert open_share(recipient, sender_public, "a", "b", first, sealed) == b"share"

    with pytest.raises(ProtocolError, match="replayed from another round"):
        open_share(recipient, sender_public, "a", "b", second, sealed)


# -- never both secrets of one node --------------------------------------------------------------


def test_a_participant_refuses_to_reveal_both_secrets_of_one_node():
    nodes = [f"node-{i}" for i in range(5)]
    updates = updates_of(nodes)
    round = start(updates, SecAggParameters(5))
    shares = shared(round)
    client = round.clients["node-0"]
    client.mask(updates["node-0"], **shares["node-0"])

    with pytest.raises(ProtocolError, match="both the self-mask seed and the mask key of 'node-2'"):
        client.unmask(survivors=["node-0", "node-1", "node-2", "node-3"], dropped=["node-2"])
    revealed = client.unmask(survivors=["node-0", "node-1", "node-2"], dropped=["node-3"])
    assert set(revealed["self_mask_shares"]) == {"node-0", "node-1", "node-2"}
    assert set(revealed["mask_key_shares"]) == {"node-3"}
    with pytest.raises(ProtocolError, match="waiting for nothing more"):  # no second request
        client.unmask(survivors=["node-0", "node-1", "node-3"], dropped=["node-2"])


def test_the_server_never_rebuilds_both_secrets_of_one_node():
    parameters = SecAggParameters(3)
    vector = np.zeros(4, dtype=parameters.word)

    with pytest.raises(SecureAggregationError, match="'b' would have both secrets rebuilt"):
        unmask_sum(
            vector + vector,
            ["a", "b"],
            {"a": bytes(32), "b": bytes(32)},
            {"b": bytes(32)},
            {"a": {"b"}, "b": {"a"}},
            {},
            parameters,
            bytes(32),
        )


# -- parameters ----------------------------------------------------------------------------------


def test_defaults_are_the_smallest_majority_of_each_neighbourhood_and_a_logarithmic_degree():
    assert SecAggParameters(3) == SecAggParameters(3, threshold=2, degree=2, modulus_bits=32)
    assert (SecAggParameters(10).degree, SecAggParameters(10).threshold) == (9, 6)
    assert (SecAggParameters(100).degree, SecAggParameters(100).threshold) == (16, 9)
    assert (SecAggParameters(1000).degree, SecAggParameters(1000).threshold) == (22, 12)


@pytest.mark.parametrize(
    "arguments, refusal",
    [
        ({"participants": 2}, "participants=2: secure aggregation needs at least 3"),
        ({"participants": 5, "threshold": 1}, "threshold=1: must be at least 2"),
        ({"participants": 5, "threshold": 6}, "threshold=6: must be at most degree \\+ 1 = 5"),
        ({"participants": 5, "threshold": 2}, "threshold=2: must be above half of the degree"),
        ({"participants": 10, "degree": 4, "threshold": 6}, "at most degree \\+ 1 = 5"),
        ({"participants": 10, "degree": 5}, "degree=5: must be 9 .* or an even number"),
        ({"participants": 10, "clip": 0}, "clip=0: must be a positive number"),
        ({"participants": 10, "bits": 33}, "bits=33: must be a whole number from 1 to 32"),
        (
            {"participants": 10, "bits": 30, "modulus_bits": 32},
            "modulus_bits=32: the sum of 10 updates of 30 bits can reach 10737418230, which "
            "wraps modulo 2\\^32: lower bits, or use modulus_bits=64",
        ),
    ],
)
def test_parameters_that_cannot_work_are_refused_saying_which_rule(arguments, refusal):
    with pytest.raises(ConfigurationError, match=refusal):
        SecAggParameters(**arguments)


def test_a_sum_that_would_wrap_modulo_2_32_gets_a_64_bit_modulus():
    assert SecAggParameters(10, bits=30).modulus_bits == 64
    assert SecAggParameters(10, bits=16).modulus_bits == 32


# -- Shamir's secret sharing ---------------------------------------------------------------------


def test_any_t_shares_rebuild_the_secret_and_fewer_or_repeated_ones_are_refused():
    secret = secrets.token_bytes(32)
    shares = split(secret, 3, [1, 2, 3, 4, 5])

    assert combine([(4, shares[4]), (1, shares[1]), (5, shares[5])], 3) == secret
    assert combine(list(shares.items()), 3) == secret  # all five agree
    with pytest.raises(SecureAggregationError, match="needs 3 shares to be rebuilt, and 2 arrived"):
        combine([(1, shares[1]), (2, shares[2])], 3)
    with pytest.raises(SecureAggregationError, match="each holder's index must appear once"):
        combine([(1, shares[1]), (1, shares[1]), (2, shares[2])], 3)


def test_an_altered_or_misrouted_share_is_caught():
    secret = secrets.token_bytes(32)
    shares = split(secret, 3, [1, 2, 3, 4])
    altered = (int.from_bytes(shares[2], "big") + 1).to_bytes(len(shares[2]), "big")
    stray = split(secrets.token_bytes(32), 3, [1, 2, 3, 4])[2]  # another secret's share

    # more than t: all on one polynomial
    with pytest.raises(SecureAggregationError, match="disagree"):
        combine([(1, shares[1]), (2, altered), (3, shares[3]), (4, shares[4])], 3)
    with pytest.raises(SecureAggregationError, match="rebuild no 32-byte secret"):  # exactly t
        combine([(1, shares[1]), (2, stray), (3, shares[3])], 3)


def test_an_altered_revealed_share_is_caught_before_it_reaches_the_sum():
    nodes = [f"node-{i}" for i in range(5)]
    updates = updates_of(nodes)
    round = start(updates, SecAggParameters(5))
    shares = shared(round)
    masked = {node: round.clients[node].mask(updates[node], **shares[node]) for node in nodes}
    requests = round.server.request_unmasking(masked)
    reveals = {node: round.clients[node].unmask(**requests[node]) for node in nodes}
    share = reveals["node-4"]["self_mask_shares"]["node-2"]
    reveals["node-4"]["self_mask_shares"]["node-2"] = share[:-1] + bytes([share[-1] ^ 1])

    with pytest.raises(
        SecureAggregationError, match="the shares of the self-mask seed of 'node-2'"
    ):
        round.server.finish(reveals)


def test_an_altered_share_among_exactly_t_is_caught_by_the_sum_it_would_unmask():
    nodes = [f"node-{i}" for i in range(5)]
    updates = updates_of(nodes)
    round = start(updates, SecAggParameters(5))  # t = 3
    shares = shared(round)
    masked = {node: round.clients[node].mask(updates[node], **shares[node]) for node in nodes}
    requests = round.server.request_unmasking(masked)
    answering = ["node-0", "node-1", "node-2"]  # exactly t: no spare share to check against
    reveals = {node: round.clients[node].unmask(**requests[node]) for node in answering}
    share = reveals["node-1"]["self_mask_shares"]["node-3"]
    reveals["node-1"]["self_mask_shares"]["node-3"] = share[:-1] + bytes([share[-1] ^ 1])

    with pytest.raises(SecureAggregationError, match="altered"):
        round.server.finish(reveals)
