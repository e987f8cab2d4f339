"""The author's API: what a FedAvgScheduler accepts, refuses, and sends."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import torch
import torchvision

from fedmagic import FedAvgScheduler
from fedmagic.errors import ConfigurationError, TaskDefinitionError
from fedmagic.examples.digits_task import DigitsScheduler
from fedmagic.engine.participant import describe_failure
from fedmagic.engine.context import current_context
from fedmagic.engine.task import TaskPackage


class Minimal(FedAvgScheduler):
    def make_model(self): return torch.nn.Linear(2, 1)
    def make_train_dataloader(self): return []
    def make_test_dataloader(self): return []
    def state_dict(self): return self.model.state_dict()
    def load_state_dict(self, state_dict): self.model.load_state_dict(state_dict)
    def train(self): pass
    def test(self): return {}


@pytest.mark.parametrize("arguments, message", [
    ({"min_clients": 3, "max_clients": 2}, "max_clients=2: must be at least min_clients (3)"),
    ({"min_clients": 0, "max_clients": 2}, "min_clients=0: must be a whole number, at least 1"),
    ({"min_clients": 1, "max_clients": 2, "merge_epochs": 0},
     "merge_epochs=0: must be a whole number, at least 1"),
    ({"min_clients": 1, "max_clients": 2, "max_rounds": -1},
     "max_rounds=-1: must be a whole number, at least 0"),
    ({"min_clients": 1, "max_clients": 2, "calculation_timeout": 0},
     "calculation_timeout=0: must be a positive number of seconds"),
    ({"min_clients": 1, "max_clients": 2, "log_rounds": 1.5},
     "log_rounds=1.5: must be a whole number, at least 0"),
    ({"min_clients": 1, "max_clients": 2, "is_centralized": "no"},
     "is_centralized='no': must be True (the initiator aggregates) or False (a participant "
     "elected each round aggregates)"),
])
def test_bad_configuration_fails_at_construction_naming_the_parameter(arguments, message):
    with pytest.raises(ConfigurationError) as error:
        Minimal(**arguments)

    assert str(error.value) == message


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "models/x", "..", "a\\b"])
def test_checkpoint_name_outside_models_is_refused_naming_the_parameter(name):
    with pytest.raises(ConfigurationError) as error:
        Minimal(min_clients=1, max_clients=1, max_rounds=1, name=name)

    assert str(error.value).startswith(f"name={name!r}: becomes the checkpoint folder "
                                       "models/<name>/, so it must be one folder name")


def test_task_id_that_would_name_a_folder_outside_models_is_refused_before_anything_runs(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigurationError) as error:
        Minimal(min_clients=1, max_clients=1, max_rounds=1).launch_task(task_id="../escape")

    assert "task_id='../escape': becomes the checkpoint folder" in str(error.value)
    assert "pass name='...' to launch under another name" in str(error.value)
    assert list(tmp_path.parent.glob("escape")) == [] and list(tmp_path.iterdir()) == []


def test_zero_max_rounds_fails_at_launch_unless_is_task_finished_decides():
    with pytest.raises(ConfigurationError, match="max_rounds=0: must be positive, or override "
                       r"is_task_finished\(\)"):
        Minimal(min_clients=1, max_clients=1).launch_task(task_id="t")


def test_merge_epoch_slip_is_answered_with_the_right_name():
    with pytest.raises(TypeError, match=r"'merge_epoch' \(did you mean merge_epochs\?\)"):
        Minimal(min_clients=1, max_clients=1, merge_epoch=2)


def test_missing_required_method_is_named_at_construction():
    class NoTest(FedAvgScheduler):
        def make_model(self): return torch.nn.Linear(2, 1)
        def make_train_dataloader(self): return []
        def make_test_dataloader(self): return []
        def state_dict(self): return {}
        def load_state_dict(self, state_dict): pass
        def train(self): pass

    with pytest.raises(TaskDefinitionError) as error:
        NoTest(min_clients=1, max_clients=1)

    assert str(error.value).startswith("NoTest does not define test(): a FedAvgScheduler "
                                       "implements make_model,")


def test_constructor_argument_that_cannot_travel_fails_at_launch_naming_it():
    class WithDevice(Minimal):
        def __init__(self, min_clients, max_clients, device=None, **rest):
            super().__init__(min_clients, max_clients, **rest)
            self.device = device

    scheduler = WithDevice(1, 1, torch.device("cpu"), max_rounds=1)

    with pytest.raises(ConfigurationError) as error:
        scheduler.launch_task(task_id="t")

    assert str(error.value).startswith("device=device(type='cpu'): cannot travel to participants")


def test_name_defaults_to_the_task_id_and_the_model_comes_from_make_model():
    scheduler = Minimal(min_clients=1, max_clients=1, max_rounds=1)

    scheduler._setup("task-42")

    assert scheduler.name == "task-42"
    assert isinstance(scheduler.model, torch.nn.Linear)


def test_package_carries_source_and_arguments_and_participants_rebuild_without_launching():
    scheduler = DigitsScheduler(2, 3, name="demo_task", max_rounds=4, learning_rate=0.1)
    package = TaskPackage.from_scheduler(scheduler, "digits")
    received = TaskPackage.from_header(package.to_header())

    rebuilt = received.build_scheduler()

    assert type(rebuilt).__name__ == "DigitsScheduler"
    assert (rebuilt.min_clients, rebuilt.max_clients, rebuilt.max_rounds) == (2, 3, 4)
    assert rebuilt.learning_rate == 0.1
    assert received.code_hash == package.code_hash
    assert received.build_verifier("node-1").current_node == "node-1"
    assert current_context() is None  # launching works again once the code has run


def test_task_source_that_launches_at_top_level_does_not_launch_on_a_participant():
    source = ("import fedmagic.examples.digits_task as d\n"
              "LAUNCHED = d.DigitsScheduler(1, 1, max_rounds=1).launch_task(task_id='x')\n")
    package = TaskPackage("x", "DigitsScheduler", source + "from fedmagic.examples."
                          "digits_task import DigitsScheduler\n", "cell", [1, 1], {})

    scheduler = package.build_scheduler()

    assert type(scheduler).__name__ == "DigitsScheduler"


def test_tampered_package_is_refused_by_its_hash():
    header = TaskPackage.from_scheduler(DigitsScheduler(1, 1, max_rounds=1), "t").to_header()
    header["source"] += "\nimport os; os.system('echo pwned')\n"

    with pytest.raises(Exception, match="code hash does not match"):
        TaskPackage.from_header(header)


def test_download_true_without_data_or_network_says_to_put_the_data_in_place(
        tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network on this node")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(Exception) as failure:
        torchvision.datasets.MNIST(str(tmp_path / "data"), train=True, download=True)

    hint = describe_failure(failure.value)

    assert "is not in place and could not be downloaded" in hint
    assert "fedmagic digits" in hint
