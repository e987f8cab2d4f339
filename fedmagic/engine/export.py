"""What a finished task leaves for use without its code.

``model.pt`` needs the task's model class to be read back; beside it go
``model.torchscript.pt``, the model as TorchScript, which ``torch.jit.load``
runs with no Python source, and ``report.json`` and ``report.md``: how the
task ran and ended, its participants and its best and last metrics. Neither
may fail the task: a model TorchScript cannot express is reported, not
raised. Every file is written to a temporary name and renamed, as
``checkpoint.py`` does, so no half-written file is ever left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..strategies.base import described_text
from ..strategies.guarantees import guarantees
from .checkpoint import write_atomically
from .state import best_point, clock, metric_series

__all__ = [
    "TORCHSCRIPT",
    "RunReport",
    "best_and_last",
    "example_input",
    "export_torchscript",
    "write_report",
]

#: The TorchScript file's name in a task's folder.
TORCHSCRIPT = "model.torchscript.pt"


def example_input(loader: Iterable[Any]) -> Any | None:
    """The inputs of ``loader``'s first batch, to trace a model with.

    Returns:
        The first element of an ``(inputs, labels)`` tuple or list, else the
        batch itself (a tensor); None if the loader is empty or raises.
    """
    try:
        batch = next(iter(loader))
    except Exception:
        return None
    if isinstance(batch, (tuple, list)):
        return batch[0] if batch else None
    return batch


def export_torchscript(model: torch.nn.Module, example: Any, path: Path) -> str | None:
    """Write ``model`` as TorchScript to ``path`` (``model.torchscript.pt``).

    Scripting keeps the model's control flow, so it comes first; tracing,
    with ``example`` as the input, records the operations one call ran and is
    refused when torch warns that the trace depends on the example's values.
    The model is in eval mode meanwhile, and each module's mode restored after.

    Args:
        model: the trained model; left as it was, on its own device.
        example: an input to trace it with (see :func:`example_input`), or None.
        path: the file to write; its folder is created if needed.

    Returns:
        None once written, else why it was not, in one line. It never raises
        for a model that cannot be exported, and then leaves no file at
        ``path``, not even an earlier run's.
    """
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with _jit_warnings():
            data, reason = _compiled(model, example)
    finally:
        for module, training in modes.items():
            module.training = training
    if data is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, data)
            return None
        except OSError as error:
            reason = f"could not be written to {path} ({_first_line(error)})"
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
    return reason


@dataclasses.dataclass(frozen=True)
class RunReport:
    """How one task ran, as ``report.json`` and ``report.md`` tell it."""

    task_id: str
    #: The task's name: its folder under ``models/``.
    name: str
    #: The strategy's name and parameters, e.g. ``{"name": "FedAdam", "eta": 0.01}``;
    #: empty for plain FedAvg.
    strategy: dict[str, Any]
    #: Rounds finished.
    rounds: int
    #: How it ended: ``finished``, ``stopped by its author after round 3``, ``failed: ...``.
    outcome: str
    #: When it started and ended (``time.time()``).
    started: float
    ended: float
    #: Each node's ``{"status": ..., "samples": ..., "rounds": ...}``.
    participants: dict[str, dict[str, Any]]
    #: One row per round, as in ``history.json``.
    history: list[dict[str, Any]]
    #: The TorchScript file's name once written; else why it was not.
    torchscript: str | None = None
    torchscript_error: str | None = None


def best_and_last(history: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each numeric metric's best and last value over the tested rounds.

    Best is the lowest for losses and errors, the highest for the rest, as
    the widget has it (:func:`~fedmagic.engine.state.best_point`).

    Returns:
        ``{"best": {metric: {"round": r, "value": v}}, "last": {...}}``, with
        no entry for a metric no tested round gave a finite number for.
    """
    best: dict[str, Any] = {}
    last: dict[str, Any] = {}
    for name, points in metric_series(history).items():
        found = best_point(name, points)
        if found is not None:
            best[name] = {"round": found[0], "value": found[1]}
            last[name] = {"round": points[-1][0], "value": points[-1][1]}
    return {"best": best, "last": last}


def write_report(directory: Path, report: RunReport) -> Path:
    """Write ``report.json`` and ``report.md`` into ``directory``.

    ``report.json`` holds the report's fields and :func:`best_and_last`'s
    ``best`` and ``last``; ``report.md`` says the same for a reader.

    Returns:
        The path of ``report.md``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    figures = best_and_last(report.history)
    content = {**dataclasses.asdict(report), **figures}
    write_atomically(directory / "report.json", json.dumps(content, indent=1, default=str).encode())
    markdown = directory / "report.md"
    write_atomically(markdown, _markdown(report, figures).encode())
    return markdown


def _compiled(model: torch.nn.Module, example: Any) -> tuple[bytes | None, str | None]:
    """The model as a TorchScript file's bytes, or why it cannot be one."""
    try:
        compiled = torch.jit.script(model)
    except Exception as error:
        scripted = _first_line(error)
        if example is None:
            return None, f"could not be scripted ({scripted}) and no example input to trace it with"
        try:
            compiled = torch.jit.trace(model, _on_device(example, _device(model)))
        except Exception as error:
            return None, f"could not be scripted ({scripted}) nor traced ({_first_line(error)})"
    buffer = io.BytesIO()
    try:
        torch.jit.save(compiled, buffer)
    except Exception as error:
        return None, f"could not be saved as TorchScript ({_first_line(error)})"
    return buffer.getvalue(), None


@contextlib.contextmanager
def _jit_warnings() -> Iterator[None]:
    """Quiet torch.jit's deprecation, and make a trace that may be wrong an error.

    torch 2.14 warns (``FutureWarning``) that ``torch.jit.script``, ``trace``,
    ``trace_method`` and ``save`` are deprecated, once per submodule scripted:
    noise to the notebook's author, who did not call them. A ``TracerWarning``
    (a Python branch or number taken from a tensor) means the trace holds for
    the example only, so it is raised and the trace refused; torch's own
    library code stays exempt, as torch itself has it. ``catch_warnings`` is
    process-wide: another thread warning meanwhile sees these filters too.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        warnings.filterwarnings("error", category=torch.jit.TracerWarning)
        warnings.filterwarnings(
            "ignore", category=torch.jit.TracerWarning, module=r"torch\.(?!jit)"
        )
        yield


def _device(model: torch.nn.Module) -> torch.device | None:
    tensor: torch.Tensor | None = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return None if tensor is None else tensor.device


def _on_device(example: Any, device: torch.device | None) -> Any:
    """The example on the model's device: test loaders yield CPU tensors."""
    if device is None:
        return example
    if isinstance(example, torch.Tensor):
        return example.to(device)
    if isinstance(example, (tuple, list)):
        return type(example)(_on_device(item, device) for item in example)
    if isinstance(example, dict):
        return {key: _on_device(value, device) for key, value in example.items()}
    return example


def _first_line(error: BaseException) -> str:
    # A TracerWarning raised inside a tensor's __bool__ arrives as the cause of a SystemError.
    if isinstance(error.__cause__, Warning):
        error = error.__cause__
    lines = str(error).strip().splitlines()
    line = lines[0].strip() if lines else type(error).__name__
    if len(line) > 120 and ". " in line:  # a TracerWarning's paragraph: its first sentence
        line = line.split(". ")[0] + "."
    return line if len(line) <= 200 else line[:199] + "…"


def _epsilon_spent(history: list[dict[str, Any]]) -> list[str]:
    """The privacy budget the rounds spent, where the strategy counted one."""
    spent = [row for row in history if "epsilon" in row]
    if not spent:
        return []
    last = spent[-1]
    return [
        f"- Epsilon spent: {last['epsilon']:.3g} at delta {last['delta']:g}, "
        f"after round {last['round']}"
    ]


def _markdown(report: RunReport, figures: dict[str, dict[str, Any]]) -> str:
    title = f"# Task `{report.task_id}`"
    if report.name != report.task_id:
        title += f" (`models/{report.name}/`)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.started))
    lines = [
        title,
        "",
        f"- Strategy: {described_text(report.strategy or {'name': 'FedAvg'})}",
        *(f"- Privacy: {line}" for line in guarantees(report.strategy)),
        *_epsilon_spent(report.history),
        f"- Ended: {report.outcome}",
        f"- Rounds: {report.rounds}",
        f"- Started {started}, ran {clock(max(report.ended - report.started, 0.0))}",
        "",
        "## Participants",
        "",
    ]
    if report.participants:
        lines += ["| node | status | samples | rounds |", "| --- | --- | ---: | ---: |"]
        lines += [
            f"| {_cell(node)} | {_cell(part.get('status'))} | {_cell(part.get('samples'))} "
            f"| {_cell(part.get('rounds'))} |"
            for node, part in report.participants.items()
        ]
    else:
        lines.append("None.")
    lines += ["", "## Metrics", ""]
    if figures["best"]:
        lines += [
            "Over the tested rounds; best is the lowest for losses and errors, the highest else.",
            "",
            "| metric | best | round | last | round |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, best in figures["best"].items():
            last = figures["last"][name]
            lines.append(
                f"| {_cell(name)} | {best['value']:.4g} | {best['round']} "
                f"| {last['value']:.4g} | {last['round']} |"
            )
    else:
        lines.append("No round was tested.")
    lines += ["", "## Model", "", _model_text(report), ""]
    return "\n".join(lines)


def _model_text(report: RunReport) -> str:
    state = (
        "- `model.pt`: the state dict; `torch.load(path, weights_only=True)` "
        "into the task's model class."
    )
    if report.torchscript:
        return (
            f"{state}\n- `{report.torchscript}`: load with "
            f'`torch.jit.load("{report.torchscript}")`, no code needed.'
        )
    why = report.torchscript_error or "not attempted"
    return f"{state}\n- TorchScript: not exported: {why}"


def _cell(value: Any) -> str:
    """Text for a Markdown table cell: one line, no column break."""
    return "" if value is None else " ".join(str(value).split()).replace("|", "\\|")
