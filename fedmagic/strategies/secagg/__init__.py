"""Secure aggregation, SecAgg+: the aggregator learns the sum of the updates, never one of them.

Bell, Bonawitz, Gascón, Lepoint and Raykova, "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead" (CCS 2020), which builds on Bonawitz et al.,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS
2017). This is the protocol's core without I/O: the classes take and return
plain dicts of bytes, ints and strings, which msgpack carries; the round loop
moves them over the relay.

Each participant ``i`` uploads its quantised update ``x_i`` under masks::

    y_i = x_i + PRG(b_i) + sum over its neighbours j of ±PRG(s_ij)    mod 2^32 (or 2^64)

``s_ij`` is agreed by X25519 between ``i`` and ``j``; the lower id adds its
mask and the higher subtracts it, so the pairwise masks of two survivors
cancel in the sum. ``b_i`` (the self-mask seed) and ``i``'s mask private key
are Shamir-shared ``t`` out of its neighbourhood (its neighbours and itself),
each share sealed for its holder. Then:

- for each survivor, ``t`` holders reveal shares of ``b_i``, and the
  aggregator removes its self mask;
- for each neighbour that dropped after sharing but before uploading, ``t``
  holders reveal shares of its mask key, and the aggregator removes the masks
  the survivors added towards it.

No participant reveals both kinds of share of one node, and ``t`` is above
half of a neighbourhood, so the aggregator never holds both secrets of a
node: with both, ``y_i`` would give ``x_i`` away.

SecAgg+'s change to SecAgg is the graph: each node has ``degree``
neighbours, not all ``n - 1``. The nodes sit on a ring in an order drawn
from the round's public nonce, each linked to the ``degree / 2`` nearest on
either side (a Harary graph); ``degree = n - 1`` is SecAgg's complete graph.

The stages, a message in and a message out at each::

    SecAggClient (each participant)              SecAggServer (the aggregator)
    advertise()                -> public keys     route_keys()         -> neighbours' keys
    share(neighbour_keys)      -> sealed shares   route_shares()       -> each one's shares
    mask(update, shares)       -> masked vector   request_unmasking()  -> survivors, dropped
    unmask(survivors, dropped) -> shares          finish()             -> the sum

The threat model is an honest-but-curious aggregator and participants that
may drop at any stage. Not covered: an aggregator that tells participants
different survivor lists (Bonawitz et al.'s signed consistency round), or
one that picks the nonce to ring a victim with colluding participants.

The modules, each one concept, each importing only those above it:

==================  ======================================================
``shamir``          Shamir's t-out-of-n sharing of a node's secrets
``keys``            X25519 agreement, HKDF derivation, sealed shares, the
                    mask PRG (:func:`expand`)
``parameters``      :class:`SecAggParameters`, :func:`default_degree`,
                    the graph (:func:`neighbours`), each node's index
``vectors``         flattening, quantising and unmasking an update
``client``          :class:`SecAggClient`, one participant's side
``server``          :class:`SecAggServer` and the :class:`SecureSum` it
                    reveals
==================  ======================================================

A round that cannot reveal its sum raises
:class:`~fedmagic.errors.SecureAggregationError`; a peer that sends what the
conversation does not allow, :class:`~fedmagic.errors.ProtocolError`;
parameters that cannot work, :class:`~fedmagic.errors.ConfigurationError`.
"""

from __future__ import annotations

from .client import SecAggClient
from .keys import expand, open_share, pairwise_mask_seed, seal_share
from .parameters import SecAggParameters, default_degree, neighbours
from .server import SecAggServer, SecureSum
from .vectors import dequantise, flatten, quantise, unflatten, unmask_sum

__all__ = [
    "SecAggClient",
    "SecAggParameters",
    "SecAggServer",
    "SecureSum",
    "default_degree",
    "dequantise",
    "expand",
    "flatten",
    "neighbours",
    "open_share",
    "pairwise_mask_seed",
    "quantise",
    "seal_share",
    "unflatten",
    "unmask_sum",
]
