"""Sharing a dataset out among participants, as researchers simulate federations: IID,
Dirichlet over labels, or by-label shards; seeded, so the same seed gives the same shares.

Three schemes, each over any map-style dataset with labels:

``iid``
    the indices shuffled and cut into equal parts.
``dirichlet``
    for each label, its examples shared out in proportions drawn from
    Dirichlet(``alpha``) (Hsu, Qi and Brown 2019, "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification"):
    small ``alpha`` gives each participant a few labels, large ``alpha``
    tends to IID.
``by-label``
    McMahan et al. 2017's pathological non-IID split: the examples sorted by
    label, cut into ``shards`` shards per participant, dealt out at random.

A :class:`Partition` says what each participant holds (sizes, label
histogram) before anything runs, and gives each its share as a
``torch.utils.data.Subset``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import ConfigurationError

__all__ = ["SCHEMES", "Partition", "labels_of", "partition", "split_indices"]

SCHEMES = ("iid", "dirichlet", "by-label")
#: Draws of Dirichlet proportions tried before giving up on a share for everyone.
_DIRICHLET_TRIES = 100


def labels_of(dataset: Any) -> np.ndarray:
    """Every example's label: a dataset's ``targets`` (torchvision's), the labels themselves
    (an array, a tensor or a sequence of them), else each item's second element."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets).reshape(-1)
    if getattr(dataset, "ndim", None) == 1 or (  # an array or a tensor of labels
        isinstance(dataset, Sequence) and all(np.isscalar(item) for item in dataset)
    ):
        return np.asarray(dataset).reshape(-1)
    labels = []
    for index in range(len(dataset)):
        item = dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ConfigurationError(
                "dataset",
                type(dataset).__name__,
                "its items are not (input, label) pairs and it has no targets: pass the "
                "labels themselves",
            )
        label = item[1]
        labels.append(int(label.item() if hasattr(label, "item") else label))
    return np.asarray(labels)


@dataclass(frozen=True)
class Partition:
    """Which examples each participant holds: ``shares[i]`` for participant ``i``."""

    shares: tuple[np.ndarray, ...]
    #: Every example's label, over the whole dataset.
    labels: np.ndarray
    scheme: str
    seed: int

    @property
    def sizes(self) -> list[int]:
        return [len(share) for share in self.shares]

    @property
    def classes(self) -> np.ndarray:
        return np.unique(self.labels)

    def histogram(self) -> np.ndarray:
        """Examples of each label (columns, in ``classes`` order) each participant holds."""
        classes = self.classes
        counts = [
            np.bincount(np.searchsorted(classes, self.labels[share]), minlength=len(classes))
            for share in self.shares
        ]
        return np.stack(counts) if counts else np.zeros((0, len(classes)), dtype=np.int64)

    def subset(self, dataset: Any, participant: int) -> Any:
        """Participant ``participant``'s share of ``dataset``, as a ``Subset``."""
        from torch.utils.data import Subset

        return Subset(dataset, self.shares[participant].tolist())

    def summary(self, rows: int = 10) -> str:
        """Sizes and labels as text: the totals, then the first ``rows`` participants."""
        sizes = np.array(self.sizes)
        held = (self.histogram() > 0).sum(axis=1)
        lines = [
            f"{len(sizes)} participants, {self.scheme} (seed {self.seed}): {sizes.sum()} "
            f"examples, {sizes.min()} to {sizes.max()} each (median {int(np.median(sizes))}), "
            f"{held.min()} to {held.max()} of {len(self.classes)} labels each"
        ]
        classes = ", ".join(map(str, self.classes))
        lines.append(f"  participant  examples  per label ({classes})")
        for index, (size, counts) in enumerate(
            zip(sizes[:rows], self.histogram()[:rows], strict=True)
        ):
            lines.append(f"  {index:>11}  {size:>8}  {' '.join(map(str, counts))}")
        if len(sizes) > rows:
            lines.append(f"  ... {len(sizes) - rows} more")
        return "\n".join(lines)


def partition(
    dataset: Any,
    participants: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    shards: int = 2,
    seed: int = 0,
    min_size: int = 1,
) -> Partition:
    """Share ``dataset``'s examples out among ``participants``, disjointly, the same for a seed.

    Args:
        dataset: a map-style dataset with labels (see :func:`labels_of`), or its labels.
        scheme: ``iid``, ``dirichlet`` or ``by-label``.
        alpha: Dirichlet's concentration (``dirichlet`` only).
        shards: shards per participant (``by-label`` only).
        min_size: the fewest examples any participant may get.

    Raises:
        ConfigurationError: for a scheme, count or parameter that cannot work, saying what would.
    """
    labels = labels_of(dataset)
    rng = np.random.default_rng(seed)
    indices = rng.permutation(len(labels))
    shares = split_indices(
        indices, labels, participants, scheme, rng, alpha=alpha, shards=shards, min_size=min_size
    )
    return Partition(tuple(np.sort(share) for share in shares), labels, scheme, seed)


def split_indices(
    indices: np.ndarray,
    labels: np.ndarray,
    participants: int,
    scheme: str,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    shards: int = 2,
    min_size: int = 1,
) -> list[np.ndarray]:
    """``indices`` (already shuffled) cut into one share per participant by ``scheme``."""
    if isinstance(participants, bool) or not isinstance(participants, int) or participants < 1:
        raise ConfigurationError("participants", participants, "must be a whole number, at least 1")
    if scheme not in SCHEMES:
        raise ConfigurationError("scheme", scheme, f"choose one of {', '.join(SCHEMES)}")
    pieces = participants * (shards if scheme == "by-label" else 1) * max(min_size, 1)
    if pieces > len(indices):
        raise ConfigurationError(
            "participants",
            participants,
            f"{scheme!r} needs at least {pieces} examples for {participants} participants "
            f"and there are {len(indices)}: use fewer participants"
            + (" or fewer shards" if scheme == "by-label" else "")
            + (" or a lower min_size" if min_size > 1 else ""),
        )
    if scheme == "iid":
        return list(np.array_split(indices, participants))
    if scheme == "by-label":
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ConfigurationError("shards", shards, "must be a whole number, at least 1")
        by_label = indices[np.argsort(labels[indices], kind="stable")]
        cut = np.array_split(by_label, shards * participants)
        dealt = rng.permutation(shards * participants).reshape(participants, shards)
        return [np.concatenate([cut[piece] for piece in hand]) for hand in dealt]
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
        raise ConfigurationError("alpha", alpha, "must be a positive number, e.g. 0.3")
    groups = [indices[labels[indices] == label] for label in np.unique(labels[indices])]
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(participants)]
        for group in groups:
            shares = rng.dirichlet(np.full(participants, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(group)).astype(int)
            for part, piece in zip(parts, np.split(group, cuts), strict=True):
                part.append(piece)
        result = [np.concatenate(part) for part in parts]
        if min(len(share) for share in result) >= min_size:
            return result
    raise ConfigurationError(
        "alpha",
        alpha,
        f"in {_DIRICHLET_TRIES} draws, some of the {participants} participants always got fewer "
        f"than min_size={min_size} of the {len(indices)} examples: raise alpha, lower "
        "min_size (0 allows empty shares), or use fewer participants",
    )
