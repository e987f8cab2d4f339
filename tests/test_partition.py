"""Sharing a dataset out among participants: IID, Dirichlet over labels, by-label shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from fedmagic.errors import ConfigurationError
from fedmagic.partition import SCHEMES, labels_of, partition

LABELS = load_digits().target


@pytest.mark.parametrize("scheme", SCHEMES)
def test_shares_are_disjoint_cover_every_example_and_come_back_the_same_for_a_seed(scheme):
    first = partition(LABELS, 20, scheme=scheme, seed=7)
    again = partition(LABELS, 20, scheme=scheme, seed=7)
    other = partition(LABELS, 20, scheme=scheme, seed=8)

    every = np.concatenate(first.shares)
    assert len(every) == len(np.unique(every)) == len(LABELS)
    assert all(np.array_equal(a, b) for a, b in zip(first.shares, again.shares, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first.shares, other.shares, strict=True))
    assert first.histogram().sum() == len(LABELS) and min(first.sizes) >= 1


def test_iid_shares_are_equal_in_size_and_hold_every_label():
    shares = partition(LABELS, 10, scheme="iid")

    assert max(shares.sizes) - min(shares.sizes) <= 1
    assert (shares.histogram() > 0).all()


def test_a_small_dirichlet_alpha_gives_each_participant_a_few_labels_and_a_large_one_all():
    def dominant_share(alpha: float) -> float:
        counts = partition(LABELS, 10, scheme="dirichlet", alpha=alpha, seed=3).histogram()
        return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))

    # IID would give each participant about a tenth of its examples in its largest label
    assert dominant_share(0.1) > 0.5
    assert dominant_share(1000.0) < 0.15


def test_by_label_shards_give_each_participant_the_labels_of_its_shards_only():
    shares = partition(LABELS, 10, scheme="by-label", shards=2, seed=1)

    # Two shards of about 90 sorted examples each: at most two labels each, plus a boundary
    assert ((shares.histogram() > 0).sum(axis=1) <= 4).all()
    assert np.median((shares.histogram() > 0).sum(axis=1)) <= 2


def test_labels_come_from_targets_or_from_each_item_and_a_subset_is_the_participants_share():
    images, labels = torch.zeros(30, 2), torch.arange(30) % 3
    dataset = TensorDataset(images, labels)

    assert labels_of(dataset).tolist() == labels.tolist()
    shares = partition(dataset, 3, scheme="iid")
    subset = shares.subset(dataset, 1)
    assert [int(dataset[i][1]) for i in shares.shares[1]] == [int(y) for _, y in subset]


def test_the_summary_shows_sizes_and_labels_before_a_run():
    text = partition(LABELS, 50, scheme="dirichlet", alpha=0.3, seed=0).summary(rows=2)

    assert text.startswith("50 participants, dirichlet (seed 0): 1797 examples, ")
    assert "of 10 labels each" in text and "... 48 more" in text


@pytest.mark.parametrize("arguments, message", [
    ({"participants": 0}, "participants=0: must be a whole number, at least 1"),
    ({"participants": 2000}, "'iid' needs at least 2000 examples for 2000 participants"),
    ({"participants": 3, "scheme": "zipf"}, "choose one of iid, dirichlet, by-label"),
    ({"participants": 3, "scheme": "dirichlet", "alpha": 0}, "alpha=0: must be a positive"),
    ({"participants": 1000, "scheme": "dirichlet", "alpha": 0.01},
     "some of the 1000 participants always got fewer than min_size=1"),
])
def test_a_partition_that_cannot_work_is_refused_saying_what_would(arguments, message):
    with pytest.raises(ConfigurationError, match=message):
        partition(LABELS, **arguments)


def test_empty_shares_are_allowed_when_asked_for():
    shares = partition(LABELS, 1000, scheme="dirichlet", alpha=0.1, min_size=0)

    assert sum(shares.sizes) == len(LABELS) and min(shares.sizes) == 0
