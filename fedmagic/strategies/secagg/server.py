"""The aggregator's side of a secure round: :class:`SecAggServer`, and the :class:`SecureSum`
it reveals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ...errors import ProtocolError, SecureAggregationError
from .keys import _KEY_BYTES, SEALED_BYTES
from .parameters import SecAggParameters, _check_round, _names, _share_indices, neighbours
from .shamir import combine
from .vectors import dequantise, flatten, unflatten, unmask_sum

__all__ = ["SecAggServer", "SecureSum"]


@dataclass(frozen=True)
class SecureSum:
    """What a secure round reveals: the sum of the ``nodes``' updates, and nothing of one."""

    #: The sum of the clipped updates, float64 tensors by name.
    total: dict[str, torch.Tensor]
    #: The participants whose updates the sum holds.
    nodes: tuple[str, ...]
    #: The most ``total`` can be off per coordinate from the exact sum of the clipped updates.
    error_bound: float


class SecAggServer:
    """The aggregator's side of a secure round: routes each stage's messages, then sums.

    Each method takes the stage's messages keyed by the sender the relay
    vouches for, and returns the next messages keyed by recipient; a node
    missing from a stage's messages has dropped.

    Args:
        nodes: every participant of the round.
        parameters: what every party agreed on.
        round_nonce: the round's public nonce, as the participants were given it.
        template: tensors shaped as the update (the global model's floating
            tensors); the sum comes back in their shapes.
    """

    def __init__(
        self,
        nodes: Sequence[str],
        parameters: SecAggParameters,
        round_nonce: bytes,
        template: Mapping[str, torch.Tensor],
    ) -> None:
        _check_round(nodes, parameters, round_nonce)
        self.nodes = tuple(nodes)
        self.parameters = parameters
        self.round_nonce = round_nonce
        self.template = dict(template)
        self._size = len(flatten(self.template))
        self._index = _share_indices(nodes)
        self._graph = neighbours(nodes, parameters.degree, round_nonce)
        self._stage = "route_keys"
        #: Why each node left the round, by node.
        self.dropped: dict[str, str] = {}
        self._keys: dict[str, dict[str, bytes]] = {}
        self._partners: dict[str, frozenset[str]] = {}
        #: The masked vectors' running sum, and whose it holds: one vector however many come.
        self._masked_total = np.zeros(self._size, dtype=parameters.word)
        self._uploaded: set[str] = set()

    def route_keys(self, adverts: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, Any]]:
        """Stage 1 to 2: to each node that advertised, ``{"neighbour_keys": {neighbour: keys}}``."""
        self._expect("route_keys")
        for node, advert in adverts.items():
            self._known(node)
            keys = {}
            for name in ("share_public_key", "mask_public_key"):
                value = advert.get(name) if isinstance(advert, Mapping) else None
                if not isinstance(value, bytes) or len(value) != _KEY_BYTES:
                    raise ProtocolError(node, f"advertised a {name} that is not 32 bytes")
                keys[name] = value
            self._keys[node] = keys
        self._left(set(self.nodes) - set(self._keys), "before advertising keys")
        self._require(len(self._keys), "nodes advertised keys")
        self._stage = "route_shares"
        return {
            node: {
                "neighbour_keys": {
                    peer: dict(self._keys[peer])
                    for peer in sorted(self._graph[node] & set(self._keys))
                }
            }
            for node in self._keys
        }

    def route_shares(self, shares: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """Stage 2 to 3: to each node that shared, ``{"shares": {sender: sealed}}``, the shares
        its neighbours that also shared sealed for it."""
        self._expect("route_shares")
        sealed: dict[str, Mapping[str, bytes]] = {}
        for sender, message in shares.items():
            self._known(sender)
            if sender not in self._keys:
                raise ProtocolError(sender, "sent shares without having advertised keys")
            addressed = message.get("shares") if isinstance(message, Mapping) else None
            if not isinstance(addressed, Mapping):
                addressed = {}
            expected = self._graph[sender] & set(self._keys)
            if set(addressed) != expected:
                raise ProtocolError(
                    sender,
                    f"sealed shares for {_names(addressed)}, but must seal one for each "
                    f"neighbour it was given keys of: {_names(expected)}",
                )
            for recipient, value in addressed.items():
                if not isinstance(value, bytes) or len(value) != SEALED_BYTES:
                    raise ProtocolError(
                        sender, f"sealed a share for {recipient!r} of the wrong size"
                    )
            sealed[sender] = addressed
        self._left(set(self._keys) - set(sealed), "before sharing its secrets")
        self._require(len(sealed), "nodes shared their secrets")
        self._partners = {node: frozenset(self._graph[node] & set(sealed)) for node in sealed}
        self._stage = "request_unmasking"
        return {
            recipient: {
                "shares": {sender: sealed[sender][recipient] for sender in sorted(partners)}
            }
            for recipient, partners in self._partners.items()
        }

    def receive_masked(self, node: str, message: Mapping[str, Any]) -> None:
        """One masked upload, ``{"masked": bytes}``, added to the running sum as it arrives.

        Raises:
            ProtocolError: for a node that did not share, a second upload, or a vector
                of the wrong length.
        """
        self._expect("request_unmasking")
        self._known(node)
        if node not in self._partners:
            raise ProtocolError(node, "uploaded a masked update without having shared")
        if node in self._uploaded:
            raise ProtocolError(node, "uploaded a second masked update in one round")
        data = message.get("masked") if isinstance(message, Mapping) else None
        word = self.parameters.word
        if (
            not isinstance(data, (bytes, np.ndarray))
            or (data.nbytes if isinstance(data, np.ndarray) else len(data))
            != self._size * word.itemsize
        ):
            raise ProtocolError(
                node,
                f"uploaded a masked update that is not {self._size} words of "
                f"{self.parameters.modulus_bits} bits: its update has other tensors than "
                "the template's",
            )
        self._masked_total += np.frombuffer(data, dtype=word)
        self._uploaded.add(node)

    def request_unmasking(
        self, masked: Mapping[str, Mapping[str, Any]] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Stage 3 to 4: to each node that uploaded, ``{"survivors": [...], "dropped": [...]}``.

        Args:
            masked: uploads not yet given to :meth:`receive_masked`, by sender.

        Raises:
            SecureAggregationError: for fewer than ``t`` uploads, naming ``t`` and who dropped.
        """
        for sender, message in (masked or {}).items():
            self.receive_masked(sender, message)
        self._expect("request_unmasking")
        self._left(set(self._partners) - self._uploaded, "before uploading its masked update")
        self._require(len(self._uploaded), "masked updates arrived")
        self._stage = "finish"
        survivors = sorted(self._uploaded)
        dropped = sorted(set(self._partners) - self._uploaded)
        return {node: {"survivors": survivors, "dropped": dropped} for node in survivors}

    def finish(self, reveals: Mapping[str, Mapping[str, Any]]) -> SecureSum:
        """Stage 4: the survivors' summed update, from the shares they revealed.

        Raises:
            ProtocolError: for a reveal of a share its sender does not hold, or
                of the wrong kind for that node.
            SecureAggregationError: for a secret with fewer than ``t`` shares revealed,
                shares that disagree, or a sum that does not unmask.
        """
        self._expect("finish")
        survivors = set(self._uploaded)
        gone = set(self._partners) - survivors
        revealed: dict[str, dict[str, list[tuple[int, bytes]]]] = {"seed": {}, "key": {}}
        for sender, message in sorted(reveals.items()):
            if sender not in survivors:
                raise ProtocolError(sender, "revealed shares without having uploaded")
            holds = self._partners[sender] | {sender}
            for field, kind, allowed in (
                ("self_mask_shares", "seed", survivors),
                ("mask_key_shares", "key", gone),
            ):
                given = message.get(field) if isinstance(message, Mapping) else None
                if not isinstance(given, Mapping):
                    raise ProtocolError(sender, f"revealed no {field} mapping")
                for node, share in given.items():
                    if node not in holds or node not in allowed:
                        raise ProtocolError(
                            sender,
                            f"revealed a share in {field} of {node!r}, which it does not hold "
                            "or which is not "
                            + ("a survivor" if kind == "seed" else "a dropped partner"),
                        )
                    revealed[kind].setdefault(node, []).append((self._index[sender], share))
        self._left(survivors - set(reveals), "before revealing shares; its update is in the sum")
        self._stage = "done"
        seeds = {
            node: self._rebuild(revealed["seed"].get(node, []), f"the self-mask seed of {node!r}")
            for node in sorted(survivors)
        }
        needed = set().union(*(self._partners[node] for node in survivors)) & gone
        keys = {}
        for node in sorted(needed):
            key = self._rebuild(revealed["key"].get(node, []), f"the mask key of {node!r}")
            public = X25519PrivateKey.from_private_bytes(key).public_key().public_bytes_raw()
            if public != self._keys[node]["mask_public_key"]:
                raise SecureAggregationError(
                    "the aggregator",
                    f"the mask key rebuilt for {node!r} is not the one it advertised: a share "
                    "was altered",
                )
            keys[node] = key
        total = unmask_sum(
            self._masked_total,
            survivors,
            seeds,
            keys,
            self._partners,
            {node: keys_["mask_public_key"] for node, keys_ in self._keys.items()},
            self.parameters,
            self.round_nonce,
        )
        values = dequantise(total, len(survivors), self.parameters)
        return SecureSum(
            total=unflatten(values, self.template),
            nodes=tuple(sorted(survivors)),
            error_bound=len(survivors) * self.parameters.step,
        )

    def _rebuild(self, shares: list[tuple[int, bytes]], what: str) -> bytes:
        if len(shares) < self.parameters.threshold:
            raise SecureAggregationError(
                "the aggregator",
                f"{what} needs t={self.parameters.threshold} shares and only {len(shares)} "
                f"of its holders revealed one; dropped: {self._dropped_text()}",
            )
        return combine(shares, self.parameters.threshold, what=what)

    def _require(self, count: int, what: str) -> None:
        if count < self.parameters.threshold:
            raise SecureAggregationError(
                "the aggregator",
                f"only {count} {what}, fewer than the threshold t={self.parameters.threshold}, "
                f"the fewest a revealed sum may hold; dropped: {self._dropped_text()}; run the "
                "round again with those who are left",
            )

    def _left(self, nodes: set[str], when: str) -> None:
        for node in sorted(nodes):
            self.dropped.setdefault(node, when)

    def _dropped_text(self) -> str:
        return ", ".join(f"{node!r} ({when})" for node, when in self.dropped.items()) or "none"

    def _known(self, node: str) -> None:
        if node not in self._index:
            raise ProtocolError(node, "is not a participant of this round")

    def _expect(self, stage: str) -> None:
        if self._stage != stage:
            raise ProtocolError(
                "the round loop",
                f"called {stage}() out of turn: the secure round is waiting for "
                + ("nothing more" if self._stage == "done" else f"{self._stage}()"),
            )
