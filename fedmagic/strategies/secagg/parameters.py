"""What every party of a secure round agrees on: the parameters and the graph of neighbours.

Also the checks both sides run on a round's nodes and nonce, and each
node's Shamir index, so the participant and the aggregator agree on them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Collection, Sequence

import numpy as np

from ...errors import ConfigurationError
from ..base import check_positive
from .keys import _framed

__all__ = ["SecAggParameters", "default_degree", "neighbours"]

_RING = b"fedmagic secagg+ v1 ring order"


def default_degree(participants: int) -> int:
    """Neighbours per node when none is given: ``min(n - 1, 2 * ceil(log2 n) + 2)``.

    Bell et al. show O(log n) neighbours suffice; the constants of their
    bound come from the dropout and corruption rates tolerated. This rule is
    a practical default: even (for the ring), everyone up to 11 nodes, 16 at
    100, 22 at 1000. Work the degree out from their analysis where those
    rates are known.
    """
    return min(participants - 1, 2 * math.ceil(math.log2(participants)) + 2)


@dataclass(frozen=True, init=False)
class SecAggParameters:
    """What every party of a secure round agrees on; refused at once if it cannot work.

    Args:
        participants: ``n``, the nodes of the round; at least 3 (with 2, each
            learns the other's update from the sum and its own).
        threshold: ``t``, the shares that rebuild a node's secret, held by its
            ``degree + 1``-node neighbourhood; also the fewest updates a
            revealed sum may hold. Above half of the neighbourhood, at most all
            of it. Default: the smallest majority, ``(degree + 1) // 2 + 1``,
            which tolerates the most dropouts.
        degree: ``k``, neighbours per node: ``n - 1`` (everyone), or an even
            number from 2 below it. Default: :func:`default_degree`.
        clip: each coordinate of the (already weighted) update is clipped to
            ``[-clip, clip]`` before it is quantised.
        bits: quantisation to ``2^bits`` levels across ``[-clip, clip]``.
        modulus_bits: 32 or 64, the masked arithmetic's modulus ``2^modulus_bits``;
            it must exceed the largest possible sum, ``n * (2^bits - 1)``.
            Default: 32 when that fits, else 64.

    Quantisation rounds stochastically, so it is unbiased; each participant's
    coordinate is off by less than one level, :attr:`step` ``= 2 * clip /
    (2^bits - 1)``, so a sum of ``m`` updates is off by less than ``m * step``
    per coordinate (:attr:`error_bound` for all ``n``).
    """

    participants: int
    threshold: int
    degree: int
    clip: float
    bits: int
    modulus_bits: int

    def __init__(
        self,
        participants: int,
        *,
        threshold: int | None = None,
        degree: int | None = None,
        clip: float = 1.0,
        bits: int = 16,
        modulus_bits: int | None = None,
    ) -> None:
        if not _whole(participants) or participants < 3:
            raise ConfigurationError(
                "participants",
                participants,
                "secure aggregation needs at least 3: with 2, each learns the other's update "
                "from the sum and its own",
            )
        degree = default_degree(participants) if degree is None else degree
        if not _whole(degree) or not (
            degree == participants - 1 or (2 <= degree < participants - 1 and degree % 2 == 0)
        ):
            raise ConfigurationError(
                "degree",
                degree,
                f"must be {participants - 1} (everyone neighbours everyone) or an even number "
                f"from 2 below it: each node links to degree / 2 nodes either side on a ring",
            )
        holders = degree + 1
        threshold = holders // 2 + 1 if threshold is None else threshold
        if not _whole(threshold) or threshold < 2:
            raise ConfigurationError(
                "threshold", threshold, "must be at least 2: with 1, one share is the secret"
            )
        if threshold > holders:
            raise ConfigurationError(
                "threshold",
                threshold,
                f"must be at most degree + 1 = {holders}, the nodes holding shares of each "
                "node's secrets (its neighbours and itself): more could never be there to "
                "rebuild them",
            )
        if 2 * threshold <= holders:
            raise ConfigurationError(
                "threshold",
                threshold,
                f"must be above half of the degree + 1 = {holders} nodes holding shares of each "
                "node's secrets, so two disjoint groups of them cannot rebuild both its "
                f"self-mask seed and its mask key (which would reveal its update); use at "
                f"least {holders // 2 + 1}",
            )
        check_positive("clip", clip)
        if not _whole(bits) or not 1 <= bits <= 32:
            raise ConfigurationError("bits", bits, "must be a whole number from 1 to 32")
        largest = participants * (2**bits - 1)
        if modulus_bits is None:
            modulus_bits = 32 if largest < 2**32 else 64
        if modulus_bits not in (32, 64):
            raise ConfigurationError("modulus_bits", modulus_bits, "must be 32 or 64")
        if largest >= 2**modulus_bits:
            raise ConfigurationError(
                "modulus_bits",
                modulus_bits,
                f"the sum of {participants} updates of {bits} bits can reach {largest}, which "
                f"wraps modulo 2^{modulus_bits}: lower bits, or use modulus_bits=64",
            )
        for name, value in (
            ("participants", participants),
            ("threshold", threshold),
            ("degree", degree),
            ("clip", float(clip)),
            ("bits", bits),
            ("modulus_bits", modulus_bits),
        ):
            object.__setattr__(self, name, value)

    @property
    def levels(self) -> int:
        """Quantisation levels across ``[-clip, clip]``."""
        return 2**self.bits

    @property
    def modulus(self) -> int:
        return 2**self.modulus_bits

    @property
    def step(self) -> float:
        """The distance between two levels: each participant's most quantisation error."""
        return 2 * self.clip / (self.levels - 1)

    @property
    def error_bound(self) -> float:
        """The most the sum of all ``n`` updates can be off per coordinate, after clipping."""
        return self.participants * self.step

    @property
    def word(self) -> np.dtype:
        """The masked vector's element: little-endian, as wide as the modulus."""
        return np.dtype("<u4" if self.modulus_bits == 32 else "<u8")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- the graph -------------------------------------------------------------------------------


def neighbours(nodes: Sequence[str], degree: int, round_nonce: bytes) -> dict[str, frozenset[str]]:
    """Each node's neighbours: everyone for ``degree >= n - 1``, else the ``degree / 2`` nearest
    either side on a ring ordered by a hash of the round's public nonce and the node's id."""
    if degree >= len(nodes) - 1:
        return {node: frozenset(nodes) - {node} for node in nodes}
    ring = sorted(
        nodes, key=lambda node: hashlib.sha256(_framed(_RING, round_nonce, node)).digest()
    )
    side = degree // 2
    return {
        node: frozenset(
            ring[(place + offset) % len(ring)] for offset in range(-side, side + 1) if offset != 0
        )
        for place, node in enumerate(ring)
    }


# -- the round's nodes -----------------------------------------------------------------------


def _check_round(nodes: Sequence[str], parameters: SecAggParameters, round_nonce: bytes) -> None:
    if len(set(nodes)) != len(nodes) or not all(isinstance(node, str) for node in nodes):
        raise ConfigurationError("nodes", list(nodes), "must be distinct string ids")
    if len(nodes) != parameters.participants:
        raise ConfigurationError(
            "nodes",
            list(nodes),
            f"lists {len(nodes)} nodes, but the parameters are for {parameters.participants}",
        )
    if not isinstance(round_nonce, bytes) or len(round_nonce) < 16:
        raise ConfigurationError(
            "round_nonce",
            round_nonce,
            "must be at least 16 fresh random bytes, e.g. secrets.token_bytes(32), so no two "
            "rounds share keys",
        )


def _share_indices(nodes: Sequence[str]) -> dict[str, int]:
    """Each node's Shamir index: its place among the sorted ids, from 1."""
    return {node: place for place, node in enumerate(sorted(nodes), start=1)}


def _names(nodes: Collection[str]) -> str:
    return ", ".join(repr(node) for node in sorted(nodes)) or "none"
