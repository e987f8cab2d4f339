"""The scikit-learn digits, written as MNIST, read by torchvision as MNIST, offline."""

from __future__ import annotations

import gzip
import socket
import struct
import urllib.request
from collections import Counter

import numpy as np
import pytest
import torchvision

from fedmagic.digits import Layout, mnist_like_digits, write_mnist, write_partitions

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TOTAL = 1797


def mnist(root, train: bool, download: bool = False) -> torchvision.datasets.MNIST:
    return torchvision.datasets.MNIST(root, train=train, download=download)


def samples(dataset) -> Counter:
    """Each (image bytes, label) as a countable item, to compare sets of images."""
    return Counter((x.numpy().tobytes(), int(y)) for x, y in zip(dataset.data, dataset.targets))


@pytest.fixture(scope="module")
def iid(tmp_path_factory) -> Layout:
    return write_partitions(tmp_path_factory.mktemp("iid"), 3, split="iid", seed=7)


@pytest.fixture(scope="module")
def by_label(tmp_path_factory) -> Layout:
    return write_partitions(tmp_path_factory.mktemp("by_label"), 5, split="by-label", seed=7)


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to reach the network fail loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", refuse)


def test_torchvision_reads_a_node_partition_as_mnist(iid):
    # Prepare
    node = iid.nodes[0]
    # Execute
    train, test = mnist(node.data_dir, train=True), mnist(node.data_dir, train=False)
    # Assert
    assert len(train) == node.train_size > 0
    assert len(test) == iid.test_size > 0
    for dataset in (train, test):
        assert tuple(dataset.data.shape[1:]) == (28, 28)
        assert dataset.data.min() == 0 and dataset.data.max() == 255
        assert set(dataset.targets.tolist()) <= set(range(10))
    image, label = train[0]
    assert image.size == (28, 28) and 0 <= label <= 9


def test_digits_sit_in_mnist_s_centred_20x20_box():
    # Execute
    images, labels = mnist_like_digits()
    # Assert
    assert images.shape == (TOTAL, 28, 28) and images.dtype == np.uint8
    assert set(labels.tolist()) == set(range(10))
    border = images.copy()
    border[:, 4:24, 4:24] = 0
    assert not border.any()


def test_download_true_finds_the_files_and_fetches_nothing(iid, no_network):
    # Execute
    loaded = [mnist(party.data_dir, train=train, download=True)
              for party in (iid.initiator, iid.nodes[0]) for train in (True, False)]
    # Assert
    assert [len(d) for d in loaded] == [0, iid.test_size, iid.nodes[0].train_size, iid.test_size]


def test_the_eight_files_are_in_root_and_in_mnist_raw_with_matching_gz_twins(iid):
    # Prepare
    root = iid.nodes[1].data_dir
    # Execute / Assert
    for name in FILES:
        for folder in (root, root / "MNIST" / "raw"):
            plain, packed = folder / name, folder / f"{name}.gz"
            assert plain.is_file() and packed.is_file()
            assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()
        assert (root / name).read_bytes() == (root / "MNIST" / "raw" / name).read_bytes()


def test_idx_headers_are_byte_for_byte_mnist_s(tmp_path):
    # Prepare
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test_images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    # Execute
    raw = write_mnist(tmp_path, images, np.arange(5), test_images, np.arange(3)) / "MNIST" / "raw"
    # Assert
    for prefix, n in (("train", 5), ("t10k", 3)):
        image_bytes = (raw / f"{prefix}-images-idx3-ubyte").read_bytes()
        label_bytes = (raw / f"{prefix}-labels-idx1-ubyte").read_bytes()
        assert struct.unpack(">IIII", image_bytes[:16]) == (0x00000803, n, 28, 28)
        assert struct.unpack(">II", label_bytes[:8]) == (0x00000801, n)
        assert len(image_bytes) == 16 + n * 28 * 28 and len(label_bytes) == 8 + n
    assert (raw / "train-images-idx3-ubyte").read_bytes()[16:] == images.tobytes()
    assert list((raw / "t10k-labels-idx1-ubyte").read_bytes()[8:]) == [0, 1, 2]


def test_iid_partitions_are_disjoint_and_together_with_the_test_set_are_every_digit(iid):
    # Prepare
    images, labels = mnist_like_digits()
    everything = Counter((x.tobytes(), int(y)) for x, y in zip(images, labels))
    # Execute
    union = samples(mnist(iid.nodes[0].data_dir, train=False))
    for node in iid.nodes:
        union += samples(mnist(node.data_dir, train=True))
    # Assert
    assert union == everything
    assert sum(n.train_size for n in iid.nodes) + iid.test_size == TOTAL
    assert max(n.train_size for n in iid.nodes) - min(n.train_size for n in iid.nodes) <= 1


def test_a_seed_always_writes_the_same_files_and_another_seed_does_not(iid, tmp_path):
    # Execute
    same = write_partitions(tmp_path / "same", 3, split="iid", seed=7)
    other = write_partitions(tmp_path / "other", 3, split="iid", seed=8)
    # Assert
    name = "train-images-idx3-ubyte"
    first = (iid.nodes[0].data_dir / name).read_bytes()
    assert (same.nodes[0].data_dir / name).read_bytes() == first
    assert (other.nodes[0].data_dir / name).read_bytes() != first


def test_by_label_partitions_hold_few_labels_each_and_do_not_overlap(by_label):
    # Execute
    datasets = [mnist(node.data_dir, train=True) for node in by_label.nodes]
    # Assert
    assert [node.name for node in by_label.nodes] == [f"node-{i}" for i in range(1, 6)]
    for dataset in datasets:
        # Two shards of ~144 sorted images, where a label has ~144: each shard spans at most
        # 3 labels, mostly 1 or 2, so a node's labels are few and 4 of them hold nearly all.
        counts = sorted(np.bincount(dataset.targets.numpy(), minlength=10), reverse=True)
        assert 1 <= np.count_nonzero(counts) <= 6
        assert sum(counts[:4]) >= 0.95 * len(dataset)
    union = sum((samples(d) for d in datasets), Counter())
    assert sum(union.values()) == sum(len(d) for d in datasets) == TOTAL - by_label.test_size


def test_initiator_has_an_empty_training_set_that_torchvision_still_loads(iid):
    # Execute
    train = mnist(iid.initiator.data_dir, train=True)
    test = mnist(iid.initiator.data_dir, train=False)
    # Assert
    assert iid.initiator.name == "initiator" and iid.initiator.train_size == 0
    assert len(train) == 0 and tuple(train.data.shape) == (0, 28, 28)
    header = (iid.initiator.data_dir / "train-images-idx3-ubyte").read_bytes()
    assert header == struct.pack(">IIII", 0x00000803, 0, 28, 28)
    assert samples(test) == samples(mnist(iid.nodes[0].data_dir, train=False))


def test_rewriting_a_party_with_training_data_replaces_its_empty_training_set(tmp_path):
    # Prepare
    images, labels = mnist_like_digits()
    write_mnist(tmp_path, images[:0], labels[:0], images[:10], labels[:10])
    # Execute
    write_mnist(tmp_path, images[10:30], labels[10:30], images[:10], labels[:10])
    # Assert
    assert len(mnist(tmp_path, train=True)) == 20


def test_data_dir_is_relative_to_each_party_s_working_directory(tmp_path, monkeypatch):
    # Prepare
    layout = write_partitions(tmp_path, 2, data_dir="demo_task/data")
    node = layout.nodes[1]
    # Execute
    monkeypatch.chdir(node.workdir)
    train = mnist("demo_task/data", train=True)
    # Assert
    assert node.workdir == tmp_path / "node-2"
    assert node.data_dir == tmp_path / "node-2" / "demo_task" / "data"
    assert len(train) == node.train_size


@pytest.mark.parametrize("kwargs, parameter", [
    ({"participants": 0}, "participants"),
    ({"participants": 10_000}, "participants"),
    ({"participants": 2, "split": "random"}, "split"),
    ({"participants": 2, "test_fraction": 0.0}, "test_fraction"),
    ({"participants": 2, "test_fraction": 1.0}, "test_fraction"),
    ({"participants": 2, "data_dir": "/abs/data"}, "data_dir"),
    ({"participants": 2, "data_dir": "../elsewhere"}, "data_dir"),
])
def test_write_partitions_refuses_bad_input_naming_the_parameter(tmp_path, kwargs, parameter):
    # Execute
    with pytest.raises(ValueError, match=parameter) as caught:
        write_partitions(tmp_path, **kwargs)
    # Assert
    assert not any(tmp_path.iterdir())
    if parameter == "split":
        assert "'iid'" in str(caught.value) and "'by-label'" in str(caught.value)


def test_by_label_refuses_more_nodes_than_it_has_shards_for(tmp_path):
    with pytest.raises(ValueError, match="participants"):
        write_partitions(tmp_path, 1000, split="by-label")


@pytest.mark.parametrize("images, labels, parameter", [
    (np.zeros((2, 28, 28), np.float32), np.zeros(2), "images"),
    (np.zeros((2, 8, 8), np.uint8), np.zeros(2), "images"),
    (np.zeros((2, 28, 28), np.uint8), np.zeros(3), "labels"),
])
def test_write_mnist_refuses_arrays_torchvision_could_not_read(tmp_path, images, labels, parameter):
    ok = np.zeros((1, 28, 28), np.uint8)
    with pytest.raises(ValueError, match=parameter):
        write_mnist(tmp_path, images, labels, ok, np.zeros(1))


def test_a_node_s_digits_are_learnable(iid):
    # Prepare
    from sklearn.linear_model import LogisticRegression
    train = mnist(iid.nodes[0].data_dir, train=True)
    test = mnist(iid.nodes[0].data_dir, train=False)
    x, x_test = (d.data.reshape(len(d), -1).numpy() / 255.0 for d in (train, test))
    # Execute
    model = LogisticRegression(max_iter=300).fit(x, train.targets.numpy())
    # Assert
    assert model.score(x_test, test.targets.numpy()) > 0.8
