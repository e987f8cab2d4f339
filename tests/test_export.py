"""What a finished task leaves for use without its code: TorchScript and a report."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedmagic.engine.export import (
    RunReport,
    best_and_last,
    example_input,
    export_torchscript,
    write_report,
)
from fedmagic.examples.digits_task import ConvNet

# Loading is the reader's business, and torch 2.14 calls torch.jit.load deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


class ReturnsASet(nn.Module):
    """Neither TorchScript nor the tracer has a type for a set."""

    def forward(self, x: torch.Tensor) -> Any:
        return {x}


class ReadsADict(nn.Module):
    """A forward TorchScript cannot compile (an unannotated argument is a Tensor to it)."""

    def forward(self, batch):  # untyped, as a task's author writes it
        if batch["x"].sum() > 0:
            return batch["x"]
        return batch["y"]


class BranchesOnAValue(nn.Module):
    """Not scriptable (a set), and a trace of it would keep one branch only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = len({2, 3})
        if x.sum() > 0:
            return x * factor
        return x


class ScalesBySetSize(nn.Module):
    """Not scriptable (a set), but its trace holds for every input."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * len({2, 3})


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_scripted_model_predicts_exactly_like_its_state_dict_loaded_into_a_fresh_model(tmp_path):
    # Prepare
    torch.manual_seed(0)
    trained = small_model()
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    fresh = small_model()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    fresh.eval()
    inputs = torch.randn(16, 4)

    # Execute
    error = export_torchscript(trained, None, tmp_path / "model.torchscript.pt")

    # Assert
    assert error is None
    assert files_in(tmp_path) == ["model.pt", "model.torchscript.pt"]  # no temporary left
    loaded = torch.jit.load(tmp_path / "model.torchscript.pt")
    with torch.no_grad():
        assert torch.equal(loaded(inputs), fresh(inputs))


def test_digits_convnet_exports_and_predicts_like_the_eager_model_in_eval_mode(tmp_path):
    # Prepare
    torch.manual_seed(0)
    model = ConvNet()
    images = torch.randn(8, 1, 28, 28)
    path = tmp_path / "model.torchscript.pt"

    # Execute
    error = export_torchscript(model, images, path)

    # Assert
    assert error is None
    loaded = torch.jit.load(path)
    assert model.training  # the caller's mode is back
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))


def test_model_that_cannot_be_scripted_is_traced_with_the_example(tmp_path):
    # Prepare
    model = ScalesBySetSize()
    path = tmp_path / "model.torchscript.pt"

    # Execute
    error = export_torchscript(model, torch.randn(2, 4), path)

    # Assert
    assert error is None
    other_batch = torch.randn(5, 4)  # another batch size: the trace does not depend on it
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(path)(other_batch), model(other_batch))


def test_model_neither_scriptable_nor_traceable_gets_a_reason_and_leaves_no_file(tmp_path):
    # Prepare
    path = tmp_path / "model.torchscript.pt"

    # Execute
    error = export_torchscript(ReturnsASet(), torch.randn(2, 4), path)

    # Assert
    assert error is not None and "\n" not in error
    assert error.startswith("could not be scripted (Set aren't supported")
    assert "nor traced (Tracer cannot infer type of" in error
    assert files_in(tmp_path) == []


def test_unscriptable_model_without_an_example_says_there_was_nothing_to_trace_with(tmp_path):
    # Execute
    error = export_torchscript(ReadsADict(), None, tmp_path / "model.torchscript.pt")

    # Assert
    assert error is not None
    assert error.startswith("could not be scripted (")
    assert error.endswith(") and no example input to trace it with")
    assert files_in(tmp_path) == []


def test_trace_that_would_keep_only_the_examples_branch_is_refused(tmp_path):
    # Execute
    error = export_torchscript(BranchesOnAValue(), torch.ones(2, 4), tmp_path / "m.pt")

    # Assert
    assert error is not None
    assert error.endswith(
        "nor traced (Converting a tensor to a Python boolean might cause the trace to be "
        "incorrect.)")
    assert files_in(tmp_path) == []


def test_failed_export_removes_an_earlier_runs_torchscript(tmp_path):
    # Prepare
    path = tmp_path / "model.torchscript.pt"
    path.write_bytes(b"an earlier run's model")

    # Execute
    error = export_torchscript(ReturnsASet(), None, path)

    # Assert
    assert error is not None
    assert not path.exists()


@pytest.mark.parametrize("model", [small_model(), ReturnsASet()], ids=["exported", "refused"])
def test_export_gives_each_module_its_train_or_eval_mode_back(tmp_path, model):
    # Prepare
    model.train()
    submodules = list(model.modules())
    submodules[-1].eval()  # a mixed model: one frozen part
    before = [module.training for module in submodules]

    # Execute
    export_torchscript(model, torch.randn(2, 4), tmp_path / "model.torchscript.pt")

    # Assert
    assert [module.training for module in model.modules()] == before


def test_export_shows_no_torch_jit_deprecation_warning(tmp_path):
    # Prepare
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        # Execute
        export_torchscript(small_model(), None, tmp_path / "a.pt")
        export_torchscript(ScalesBySetSize(), torch.randn(2, 4), tmp_path / "b.pt")

    # Assert
    assert [str(w.message) for w in caught if "torch.jit" in str(w.message)] == []


class Broken(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        raise OSError("the test data is gone")


def test_example_input_is_the_first_batchs_inputs_or_none():
    # Prepare
    images, labels = torch.randn(6, 1, 28, 28), torch.arange(6)
    pairs = DataLoader(TensorDataset(images, labels), batch_size=4)
    bare = DataLoader(images, batch_size=4)
    empty = DataLoader(TensorDataset(images[:0], labels[:0]), batch_size=4)

    # Execute, Assert
    assert torch.equal(example_input(pairs), images[:4])
    assert torch.equal(example_input(bare), images[:4])
    assert example_input(empty) is None
    assert example_input(DataLoader(Broken(), batch_size=2)) is None


HISTORY = [
    {"round": 1, "participants": 2, "samples": 900, "tested": True, "seconds": 3.0,
     "accuracy": 0.5, "loss": 1.0},
    {"round": 2, "participants": 2, "samples": 900, "tested": False, "seconds": 2.5},
    {"round": 3, "participants": 2, "samples": 900, "tested": True, "seconds": 2.7,
     "accuracy": 0.8, "loss": 0.45},
    # not tested: whatever it holds is no test result
    {"round": 4, "participants": 1, "samples": 450, "tested": False, "seconds": 2.1,
     "accuracy": 0.99},
    {"round": 5, "participants": 2, "samples": 900, "tested": True, "seconds": 2.6,
     "accuracy": 0.7, "loss": 0.4, "note": "lr halved"},
]


def report(**changes: Any) -> RunReport:
    fields: dict[str, Any] = dict(
        task_id="digits", name="digits", strategy={"name": "FedAdam", "eta": 0.01}, rounds=5,
        outcome="finished", started=1_700_000_000.0, ended=1_700_000_083.0,
        participants={"hospital-a": {"status": "uploaded", "samples": 450, "rounds": 5},
                      "hospital-b": {"status": "timed out", "samples": 450, "rounds": 4}},
        history=HISTORY, torchscript="model.torchscript.pt", torchscript_error=None)
    fields.update(changes)
    return RunReport(**fields)


def test_best_is_the_highest_accuracy_and_the_lowest_loss_over_tested_rounds_only():
    # Execute
    figures = best_and_last(HISTORY)

    # Assert
    assert figures == {
        "best": {"accuracy": {"round": 3, "value": 0.8}, "loss": {"round": 5, "value": 0.4}},
        "last": {"accuracy": {"round": 5, "value": 0.7}, "loss": {"round": 5, "value": 0.4}},
    }


def test_report_json_holds_the_run_and_its_best_and_last_metrics(tmp_path):
    # Execute
    write_report(tmp_path, report())

    # Assert
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["task_id"] == "digits" and saved["outcome"] == "finished"
    assert saved["strategy"] == {"name": "FedAdam", "eta": 0.01}
    assert saved["participants"]["hospital-b"]["status"] == "timed out"
    assert saved["history"] == HISTORY
    assert saved["best"] == best_and_last(HISTORY)["best"]
    assert saved["last"] == best_and_last(HISTORY)["last"]
    assert saved["torchscript"] == "model.torchscript.pt" and saved["torchscript_error"] is None
    assert files_in(tmp_path) == ["report.json", "report.md"]


def test_report_md_tells_strategy_ending_participants_best_accuracy_and_torchscript(tmp_path):
    # Execute
    markdown = write_report(tmp_path, report()).read_text()

    # Assert
    assert markdown.startswith("# Task `digits`\n")
    assert "Strategy: FedAdam(eta=0.01)" in markdown
    assert "Ended: finished" in markdown
    assert "Rounds: 5" in markdown and "ran 1:23" in markdown
    assert "| hospital-b | timed out | 450 | 4 |" in markdown
    assert "| accuracy | 0.8 | 3 | 0.7 | 5 |" in markdown
    assert "| loss | 0.4 | 5 | 0.4 | 5 |" in markdown
    assert 'load with `torch.jit.load("model.torchscript.pt")`' in markdown


def test_report_md_says_why_the_model_was_not_exported(tmp_path):
    # Prepare
    why = "could not be scripted (Set aren't supported:) and no example input to trace it with"

    # Execute
    markdown = write_report(
        tmp_path, report(strategy={}, torchscript=None, torchscript_error=why,
                         outcome="stopped by its author after round 3", history=[])
    ).read_text()

    # Assert
    assert "Strategy: FedAvg" in markdown
    assert "Ended: stopped by its author after round 3" in markdown
    assert f"TorchScript: not exported: {why}" in markdown
    assert "No round was tested." in markdown


def test_a_finished_task_leaves_torchscript_that_predicts_like_model_pt_and_a_report(tmp_path):
    from test_rounds import run_task, sends
    from tiny import Tiny

    result, events, _ = run_task(tmp_path, {"a": sends(1.5), "b": sends(2.5)}, rounds=2,
                                 min_clients=2)

    folder = result.checkpoint
    eager = Tiny(min_clients=1, max_clients=1).make_model()
    eager.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    scripted = torch.jit.load(str(folder / "model.torchscript.pt"))
    inputs = torch.randn(5, 4)
    assert torch.equal(scripted(inputs), eager(inputs))
    report = json.loads((folder / "report.json").read_text())
    assert report["outcome"] == "finished" and report["rounds"] == 2
    assert report["strategy"]["name"] == "FedAvg"
    assert report["participants"]["a"]["rounds"] == 2
    assert report["last"]["w"] == {"round": 2, "value": pytest.approx(2.0)}
    assert "model.torchscript.pt" in (folder / "report.md").read_text()
