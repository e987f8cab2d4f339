"""Shamir's t-out-of-n secret sharing, for the secrets secure aggregation hands out.

Shamir, "How to Share a Secret" (1979): a secret is the value at 0 of a
random polynomial of degree ``t - 1`` over a prime field; each holder gets
the polynomial's value at its own index. Any ``t`` values give the
polynomial back (Lagrange interpolation at 0); fewer say nothing about the
secret. The field is that of the Mersenne prime 2^521 - 1, larger than any
32-byte secret (an X25519 private key, a mask seed). Every coefficient comes
from :mod:`secrets`.

Shares travel as :data:`SHARE_BYTES` big-endian bytes; the index is the
holder's, known to both sides, so it does not travel.
"""

from __future__ import annotations

import secrets
from typing import Iterable, Sequence

from ...errors import ConfigurationError, SecureAggregationError

__all__ = ["PRIME", "SHARE_BYTES", "combine", "split"]

#: The field's prime, 2^521 - 1: above every secret of up to 65 bytes.
PRIME = 2**521 - 1
#: Bytes of one share on the wire.
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66
_MOST_SECRET_BYTES = (PRIME.bit_length() - 1) // 8  # 65


def split(secret: bytes, threshold: int, indices: Iterable[int]) -> dict[int, bytes]:
    """Shares of ``secret``, one per index, any ``threshold`` of which rebuild it.

    Args:
        secret: at most 65 bytes.
        threshold: how many shares rebuild the secret; fewer reveal nothing.
        indices: the holders' indices, distinct, from 1 (0 would be the secret itself).

    Raises:
        ConfigurationError: for a secret too long, repeated or out-of-range indices,
            or a threshold above the number of holders.
    """
    holders = list(indices)
    if len(secret) > _MOST_SECRET_BYTES:
        raise ConfigurationError(
            "secret", f"{len(secret)} bytes", f"must be at most {_MOST_SECRET_BYTES} bytes"
        )
    _check_indices(holders)
    if not 1 <= threshold <= len(holders):
        raise ConfigurationError(
            "threshold",
            threshold,
            f"must be from 1 to the {len(holders)} holders: no fewer could rebuild it",
        )
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {index: _encode(_evaluate(coefficients, index)) for index in holders}


def combine(
    shares: Sequence[tuple[int, bytes]], threshold: int, *, size: int = 32, what: str = "a secret"
) -> bytes:
    """The ``size``-byte secret that ``shares`` (index, share) were split from.

    With more than ``threshold`` shares, every one beyond the first
    ``threshold`` is checked to lie on the same polynomial, so a share that
    was altered or misrouted is caught, not silently used.

    Args:
        what: the secret's name in error messages, e.g. "the self-mask seed of 'n3'".

    Raises:
        SecureAggregationError: for fewer than ``threshold`` shares, a repeated index,
            shares that disagree, or a result that is not a ``size``-byte secret
            (how a share of another secret among exactly ``threshold`` shows, almost
            surely; a share nudged by a little may pass here, and must be caught where
            the secret is used).
    """
    if len(shares) < threshold:
        raise SecureAggregationError(
            "the aggregator",
            f"{what} needs {threshold} shares to be rebuilt, and {len(shares)} arrived",
        )
    indices = [index for index, _ in shares]
    try:
        _check_indices(indices)
    except ConfigurationError as refused:
        raise SecureAggregationError(
            "the aggregator", f"the shares of {what}: {refused.reason}"
        ) from None
    points = [(index, _decode(share, what)) for index, share in shares]
    basis, extra = points[:threshold], points[threshold:]
    for index, value in extra:
        if _interpolate(basis, index) != value:
            raise SecureAggregationError(
                "the aggregator",
                f"the shares of {what} disagree (the share at index {index} is not on the "
                f"polynomial the first {threshold} give): one was altered or sent by the "
                "wrong holder",
            )
    secret = _interpolate(basis, 0)
    if secret >> (8 * size):
        raise SecureAggregationError(
            "the aggregator",
            f"the shares of {what} rebuild no {size}-byte secret: one was altered or sent by "
            "the wrong holder",
        )
    return secret.to_bytes(size, "big")


def _check_indices(indices: Sequence[int]) -> None:
    repeated = sorted({index for index in indices if indices.count(index) > 1})
    if repeated:
        raise ConfigurationError("indices", repeated, "each holder's index must appear once")
    outside = [index for index in indices if not 0 < index < PRIME]
    if outside:
        raise ConfigurationError("indices", outside, "must be from 1 to 2^521 - 2")


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):  # Horner's rule
        value = (value * x + coefficient) % PRIME
    return value


def _interpolate(points: Sequence[tuple[int, int]], x: int) -> int:
    """The value at ``x`` of the polynomial of degree ``len(points) - 1`` through ``points``."""
    total = 0
    for m, (x_m, y_m) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(points):
            if j != m:
                numerator = numerator * (x - x_j) % PRIME
                denominator = denominator * (x_m - x_j) % PRIME
        total = (total + y_m * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def _encode(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def _decode(share: bytes, what: str) -> int:
    if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
        value = -1
    else:
        value = int.from_bytes(share, "big")
    if not 0 <= value < PRIME:
        raise SecureAggregationError(
            "the aggregator",
            f"a share of {what} is not a field element of {SHARE_BYTES} bytes: it was altered",
        )
    return value
