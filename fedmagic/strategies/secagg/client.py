"""The participant's side of a secure round: :class:`SecAggClient`."""

from __future__ import annotations

import secrets
from typing import Any, Mapping, Sequence

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ...errors import ConfigurationError, ProtocolError, SecureAggregationError
from .keys import _KEY_BYTES, expand, open_share, pairwise_mask_seed, seal_share
from .parameters import SecAggParameters, _check_round, _names, _share_indices, neighbours
from .shamir import SHARE_BYTES, split
from .vectors import flatten, quantise

__all__ = ["SecAggClient"]


class SecAggClient:
    """One participant's side of a secure round: a message in, a message out, at each stage.

    Its keys and seeds are fresh for each round; make one per round.

    Args:
        node: this participant's id.
        nodes: every participant of the round, this one included.
        parameters: what every party agreed on.
        round_nonce: the round's public nonce, at least 16 fresh random bytes:
            every key is bound to it, and the graph is drawn from it.
    """

    def __init__(
        self,
        node: str,
        nodes: Sequence[str],
        parameters: SecAggParameters,
        round_nonce: bytes,
    ) -> None:
        _check_round(nodes, parameters, round_nonce)
        if node not in nodes:
            raise ConfigurationError("node", node, "must be one of the round's nodes")
        self.node = node
        self.parameters = parameters
        self.round_nonce = round_nonce
        self._index = _share_indices(nodes)
        self._graph = neighbours(nodes, parameters.degree, round_nonce)[node]
        self._share_private = X25519PrivateKey.generate()
        self._mask_private = X25519PrivateKey.generate()
        self._stage = "advertise"
        self._keys: dict[str, Mapping[str, bytes]] = {}
        self._seed = b""
        self._own_shares: tuple[bytes, bytes] = (b"", b"")
        self._held: dict[str, tuple[bytes, bytes]] = {}

    def advertise(self) -> dict[str, bytes]:
        """Stage 1: ``{"share_public_key", "mask_public_key"}``, 32 bytes each."""
        self._expect("advertise")
        self._stage = "share"
        return {
            "share_public_key": self._share_private.public_key().public_bytes_raw(),
            "mask_public_key": self._mask_private.public_key().public_bytes_raw(),
        }

    def share(self, neighbour_keys: Mapping[str, Mapping[str, bytes]]) -> dict[str, Any]:
        """Stage 2: shares of the self-mask seed and of the mask key, sealed for each neighbour.

        Args:
            neighbour_keys: the advertised keys of the neighbours that advertised.

        Returns:
            ``{"shares": {neighbour: sealed bytes}}``.

        Raises:
            ProtocolError: for keys of a node that is not a neighbour, or
                malformed or repeated keys.
            SecureAggregationError: when fewer than ``t`` nodes (itself included)
                could hold the shares: the node cannot take part.
        """
        self._expect("share")
        own = self._public_keys()
        for peer, keys in neighbour_keys.items():
            if peer not in self._graph:
                raise ProtocolError(
                    "the aggregator",
                    f"sent {self.node!r} the keys of {peer!r}, which is not its neighbour in "
                    "this round's graph",
                )
            for name in ("share_public_key", "mask_public_key"):
                value = keys.get(name) if isinstance(keys, Mapping) else None
                if not isinstance(value, bytes) or len(value) != _KEY_BYTES or value in own:
                    raise ProtocolError(
                        "the aggregator",
                        f"sent {self.node!r} a {name} of {peer!r} that is not 32 bytes, or "
                        f"is one of {self.node!r}'s own keys",
                    )
        self._check_enough(len(neighbour_keys) + 1, "could hold shares of its secrets")
        holders = [*neighbour_keys, self.node]
        indices = [self._index[holder] for holder in holders]
        threshold = self.parameters.threshold
        self._seed = secrets.token_bytes(_KEY_BYTES)
        seed_shares = split(self._seed, threshold, indices)
        key_shares = split(self._mask_private.private_bytes_raw(), threshold, indices)
        sealed = {
            peer: seal_share(
                self._share_private,
                keys["share_public_key"],
                self.node,
                peer,
                self.round_nonce,
                seed_shares[self._index[peer]] + key_shares[self._index[peer]],
            )
            for peer, keys in neighbour_keys.items()
        }
        mine = self._index[self.node]
        self._own_shares = (seed_shares[mine], key_shares[mine])
        self._keys = dict(neighbour_keys)
        self._stage = "mask"
        return {"shares": sealed}

    def mask(
        self, update: Mapping[str, torch.Tensor], shares: Mapping[str, bytes]
    ) -> dict[str, Any]:
        """Stage 3: the update, quantised and masked, to upload.

        Args:
            update: the (already weighted) update, tensors by name; they are
                flattened in order of sorted name.
            shares: the sealed shares the neighbours that shared sent this
                node; exactly these become its mask partners.

        Returns:
            ``{"masked": bytes}``: the masked vector, little-endian words of
            ``modulus_bits``.

        Raises:
            ProtocolError: for a share from a node it sealed none for, or one
                that does not authenticate (naming sender and recipient).
            SecureAggregationError: when fewer than ``t`` nodes, itself included,
                hold its shares.
            UnsupportedTensor: for a tensor of the update that cannot be summed.
        """
        self._expect("mask")
        held = {}
        for sender in sorted(shares):
            if sender not in self._keys:
                raise ProtocolError(
                    sender, f"sent {self.node!r} a share, but {self.node!r} sealed none for it"
                )
            plain = open_share(
                self._share_private,
                self._keys[sender]["share_public_key"],
                sender,
                self.node,
                self.round_nonce,
                shares[sender],
            )
            if len(plain) != 2 * SHARE_BYTES:
                raise ProtocolError(sender, f"sealed a share for {self.node!r} of the wrong size")
            held[sender] = (plain[:SHARE_BYTES], plain[SHARE_BYTES:])
        self._check_enough(len(held) + 1, "hold shares of its secrets")
        word = self.parameters.word
        masked = quantise(flatten(update), self.parameters)
        masked += expand(self._seed, masked.size, word)
        for partner in held:
            seed = pairwise_mask_seed(
                self._mask_private,
                self._keys[partner]["mask_public_key"],
                self.node,
                partner,
                self.round_nonce,
            )
            if self.node < partner:
                masked += expand(seed, masked.size, word)
            else:
                masked -= expand(seed, masked.size, word)
        self._held = held
        self._stage = "unmask"
        return {"masked": masked.tobytes()}

    def unmask(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, Any]:
        """Stage 4: the shares that let the aggregator take the masks off, once.

        For each survivor, the share of its self-mask seed; for each dropped
        partner, the share of its mask key. Never both for one node, and only
        once a round, so no second request can ask for the other kind.

        Returns:
            ``{"self_mask_shares": {survivor: bytes}, "mask_key_shares": {dropped: bytes}}``.

        Raises:
            ProtocolError: for a node listed both as survivor and dropped, this
                node not among the survivors, or a second request.
            SecureAggregationError: for fewer than ``t`` survivors, naming ``t`` and the dropped.
        """
        self._expect("unmask")
        survived, gone = set(survivors), set(dropped)
        both = survived & gone
        if both:
            raise ProtocolError(
                "the aggregator",
                f"asked {self.node!r} for shares of both the self-mask seed and the mask key "
                f"of {_names(both)}: together they reveal an update, so it reveals neither",
            )
        if self.node not in survived:
            raise ProtocolError(
                "the aggregator",
                f"lists {self.node!r} as not having uploaded, yet asks it to reveal shares",
            )
        if len(survived) < self.parameters.threshold:
            raise SecureAggregationError(
                self.node,
                f"{len(survived)} masked updates arrived, fewer than the threshold "
                f"t={self.parameters.threshold}, the fewest a revealed sum may hold; "
                f"dropped: {_names(gone)}",
            )
        self._stage = "done"
        held = {**self._held, self.node: self._own_shares}
        return {
            "self_mask_shares": {
                node: shares[0] for node, shares in held.items() if node in survived
            },
            "mask_key_shares": {node: shares[1] for node, shares in held.items() if node in gone},
        }

    def _public_keys(self) -> set[bytes]:
        return {
            self._share_private.public_key().public_bytes_raw(),
            self._mask_private.public_key().public_bytes_raw(),
        }

    def _expect(self, stage: str) -> None:
        if self._stage != stage:
            waiting = "nothing more" if self._stage == "done" else f"{self._stage}()"
            raise ProtocolError(
                "the aggregator",
                f"asked {self.node!r} to {stage}() out of turn: this round it is waiting "
                f"for {waiting}",
            )

    def _check_enough(self, holders: int, what: str) -> None:
        if holders < self.parameters.threshold:
            raise SecureAggregationError(
                self.node,
                f"only {holders} nodes, {self.node!r} included, {what}, fewer than the "
                f"threshold t={self.parameters.threshold}: {self.node!r} cannot take part in "
                "this round",
            )
