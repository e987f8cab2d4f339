"""The keys of a secure round: X25519 agreement, HKDF derivation, sealed shares, the mask PRG.

Every key is derived for one purpose, one pair of nodes and one round: the
info given to HKDF frames a label, both node ids and the round's nonce, so a
key (or a share sealed under it) is good nowhere else.
"""

from __future__ import annotations

import secrets

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ...errors import ProtocolError
from .shamir import SHARE_BYTES

__all__ = ["expand", "open_share", "pairwise_mask_seed", "seal_share"]

_SHARE_KEY = b"fedmagic secagg+ v1 share key"
_SHARE_SEALED = b"fedmagic secagg+ v1 sealed share"
_MASK_SEED = b"fedmagic secagg+ v1 pairwise mask seed"
_KEY_BYTES = 32
_AEAD_NONCE_BYTES = 12
#: A sealed share: the AEAD nonce, a share of b and one of the mask key, the tag.
SEALED_BYTES = _AEAD_NONCE_BYTES + 2 * SHARE_BYTES + 16


def _framed(*parts: bytes | str) -> bytes:
    """Parts joined with their lengths, so no two different lists of parts give the same bytes."""
    encoded = [part.encode() if isinstance(part, str) else part for part in parts]
    return b"".join(len(part).to_bytes(4, "big") + part for part in encoded)


def _agree(private: X25519PrivateKey, peer_public: bytes, peer: str) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except (TypeError, ValueError):
        raise ProtocolError(
            peer, "its public key is not a valid X25519 key (32 bytes, not of low order)"
        ) from None


def _derive(shared: bytes, *info: bytes | str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=_framed(*info)
    ).derive(shared)


def pairwise_mask_seed(
    private: X25519PrivateKey, peer_public: bytes, node: str, peer: str, round_nonce: bytes
) -> bytes:
    """The seed of the mask ``node`` and ``peer`` add with opposite signs; both derive the same."""
    low, high = sorted((node, peer))
    return _derive(_agree(private, peer_public, peer), _MASK_SEED, low, high, round_nonce)


def seal_share(
    private: X25519PrivateKey,
    recipient_public: bytes,
    sender: str,
    recipient: str,
    round_nonce: bytes,
    plaintext: bytes,
) -> bytes:
    """``plaintext`` sealed by ``sender`` for ``recipient`` in this round only (ChaCha20-Poly1305).

    The key is agreed for that direction and round, and the associated data
    names both nodes and the round, so the sealed bytes open nowhere else.
    """
    key = _derive(
        _agree(private, recipient_public, recipient), _SHARE_KEY, sender, recipient, round_nonce
    )
    aead_nonce = secrets.token_bytes(_AEAD_NONCE_BYTES)
    bound = _framed(_SHARE_SEALED, sender, recipient, round_nonce)
    return aead_nonce + ChaCha20Poly1305(key).encrypt(aead_nonce, plaintext, bound)


def open_share(
    private: X25519PrivateKey,
    sender_public: bytes,
    sender: str,
    recipient: str,
    round_nonce: bytes,
    sealed: bytes,
) -> bytes:
    """What ``sender`` sealed for ``recipient`` this round.

    Raises:
        ProtocolError: naming the sender, for bytes that were altered, sealed
            for another node or replayed from another round.
    """
    if not isinstance(sealed, bytes) or len(sealed) < _AEAD_NONCE_BYTES + 16:
        raise ProtocolError(sender, f"sent {recipient!r} a share that is not sealed bytes")
    key = _derive(
        _agree(private, sender_public, sender), _SHARE_KEY, sender, recipient, round_nonce
    )
    bound = _framed(_SHARE_SEALED, sender, recipient, round_nonce)
    try:
        return ChaCha20Poly1305(key).decrypt(
            sealed[:_AEAD_NONCE_BYTES], sealed[_AEAD_NONCE_BYTES:], bound
        )
    except InvalidTag:
        raise ProtocolError(
            sender,
            f"the share it sent {recipient!r} does not authenticate for this round: it was "
            "altered, sealed for another node, or replayed from another round",
        ) from None


def expand(seed: bytes, count: int, word: np.dtype) -> np.ndarray:
    """``count`` pseudo-random words from a 32-byte ``seed``: ChaCha20's keystream."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(count * word.itemsize)), dtype=word)
