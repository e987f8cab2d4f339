"""An update as the masked arithmetic sees it: flattened, quantised, masked and unmasked.

An update's tensors become one float64 vector (by sorted name), then words
modulo ``2^modulus_bits`` (clipped, rounded stochastically); the aggregator
sums the masked words, takes every mask off and turns the sum back into
floats and tensors.
"""

from __future__ import annotations

import secrets
from typing import Collection, Mapping

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ...errors import SecureAggregationError, UnsupportedTensor
from .keys import _KEY_BYTES, expand, pairwise_mask_seed
from .parameters import SecAggParameters, _names

__all__ = ["dequantise", "flatten", "quantise", "unflatten", "unmask_sum"]


def flatten(update: Mapping[str, torch.Tensor]) -> np.ndarray:
    """One float64 vector of ``update``'s values, tensor after tensor in order of sorted name.

    Raises:
        UnsupportedTensor: for a tensor that is not floating-point or holds NaN or infinity.
    """
    parts = []
    for name in sorted(update):
        tensor = update[name]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise UnsupportedTensor(
                name,
                f"a {getattr(tensor, 'dtype', type(tensor).__name__)}",
                "secure aggregation sums floating-point updates; leave integer buffers "
                "(BatchNorm's counters) out of the update",
            )
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # the one floating dtype numpy lacks
            tensor = tensor.float()
        # In numpy: torch's thread pool costs far more than the arithmetic on a busy machine.
        part = tensor.numpy().reshape(-1)
        if not np.isfinite(part).all():
            raise UnsupportedTensor(
                name,
                "not finite (NaN or infinity)",
                "clipping would hide a diverged update; lower the learning rate",
            )
        parts.append(part)
    return np.concatenate(parts, dtype=np.float64) if parts else np.zeros(0)


def unflatten(values: np.ndarray, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``values`` cut back into float64 tensors shaped as ``template``'s, by sorted name."""
    tensors, start = {}, 0
    for name in sorted(template):
        size = template[name].numel()
        chunk = torch.from_numpy(np.array(values[start : start + size], dtype=np.float64))
        tensors[name] = chunk.reshape(template[name].shape)
        start += size
    return tensors


def quantise(
    values: np.ndarray, parameters: SecAggParameters, rounding_seed: bytes | None = None
) -> np.ndarray:
    """Each value clipped to ``[-clip, clip]`` and rounded stochastically to a level in
    ``0 .. 2^bits - 1``: up with probability the fraction, so the expected level is exact.

    Stochastic, not nearest, rounding: nearest is biased per coordinate and
    its bias accumulates over participants and rounds; stochastic rounding's
    error averages out. Its random draws are ChaCha20's from a fresh
    ``secrets`` seed (``rounding_seed`` only to replay one).
    """
    clip, top = parameters.clip, parameters.levels - 1
    scaled = (np.clip(values, -clip, clip) + clip) * (top / (2 * clip))
    low = np.floor(scaled)
    seed = secrets.token_bytes(_KEY_BYTES) if rounding_seed is None else rounding_seed
    uniform = expand(seed, values.size, np.dtype("<u4")) * 2.0**-32
    levels = np.minimum(low + (uniform < scaled - low), top)
    return levels.astype(parameters.word)


def dequantise(total: np.ndarray, count: int, parameters: SecAggParameters) -> np.ndarray:
    """A sum of ``count`` quantised vectors as the float64 sum of the values they stand for."""
    return total.astype(np.float64) * parameters.step - count * parameters.clip


def unmask_sum(
    masked: np.ndarray,
    survivors: Collection[str],
    self_mask_seeds: Mapping[str, bytes],
    dropped_mask_keys: Mapping[str, bytes],
    partners: Mapping[str, Collection[str]],
    mask_public_keys: Mapping[str, bytes],
    parameters: SecAggParameters,
    round_nonce: bytes,
) -> np.ndarray:
    """The sum of the survivors' quantised updates: their ``masked`` vectors' sum, with every
    mask removed.

    Args:
        masked: the sum of the survivors' masked vectors (modulo the word's size).
        survivors: the nodes whose masked vectors it sums.
        self_mask_seeds: each survivor's rebuilt ``b_i``.
        dropped_mask_keys: the rebuilt mask private key of each node that
            dropped after sharing and was a survivor's partner.
        partners: the nodes each survivor masked with (those whose shares it got).
        mask_public_keys: every node's advertised mask public key.

    Raises:
        SecureAggregationError: for a node among both the survivors and the dropped
            (its update would show), a survivor without its seed, a dropped
            partner without its key, or a sum out of range (a wrong share or
            vector; for any but the tiniest model the check catches it almost surely).
    """
    both = sorted(set(survivors) & set(dropped_mask_keys))
    if both:
        raise SecureAggregationError(
            "the aggregator",
            f"{_names(both)} would have both secrets rebuilt, as survivors and as dropped, "
            "which reveals their updates; a node is one or the other",
        )
    unseeded = sorted(set(survivors) - set(self_mask_seeds))
    if unseeded:
        raise SecureAggregationError(
            "the aggregator", f"no self-mask seed was rebuilt for {_names(unseeded)}"
        )
    word = parameters.word
    total = masked.astype(word, copy=True)
    for node in survivors:
        total -= expand(self_mask_seeds[node], total.size, word)
    for node in survivors:
        for partner in sorted(set(partners[node]) - set(survivors)):
            if partner not in dropped_mask_keys:
                raise SecureAggregationError(
                    "the aggregator",
                    f"{partner!r} masked with {node!r}, yet neither uploaded nor had its mask "
                    "key rebuilt: the mask between them cannot come off",
                )
            private = X25519PrivateKey.from_private_bytes(dropped_mask_keys[partner])
            seed = pairwise_mask_seed(private, mask_public_keys[node], partner, node, round_nonce)
            if node < partner:  # what the survivor added, taken back
                total -= expand(seed, total.size, word)
            else:
                total += expand(seed, total.size, word)
    largest = len(survivors) * (parameters.levels - 1)
    wrong = int(np.count_nonzero(total > largest))
    if wrong:
        raise SecureAggregationError(
            "the aggregator",
            f"{wrong} coordinates of the unmasked sum are above the largest sum of "
            f"{len(survivors)} updates: a share or a masked vector was altered",
        )
    return total
