"""What a task leaves on the initiator's disk: ``models/<name>/``.

``model.pt`` (the global state dict, loadable with ``weights_only=True``),
``history.json`` and ``history.csv`` (one row per round),
``strategy.pt`` (what the strategy learned across rounds, such as FedAdam's
moments, when it learns anything) and ``checkpoint.json`` (which round the
files belong to, to resume from).
Every file is written to a temporary name and renamed, so a task stopped
mid-write leaves the previous round's files intact.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import ConfigurationError
from ..strategies import Strategy

__all__ = ["Checkpoint", "check_folder_name", "write_atomically"]


def check_folder_name(parameter: str, name: str) -> None:
    """Refuse a task name that would put its checkpoint outside ``models/``.

    The name becomes one folder under ``models/``: a separator, ``..`` or an
    absolute path would let a task write, and overwrite, files anywhere.

    Raises:
        ConfigurationError: naming ``parameter``.
    """
    if name in (".", "..") or any(bad in name for bad in ("/", "\\", "\0")) or os.path.isabs(name):
        raise ConfigurationError(
            parameter,
            name,
            "becomes the checkpoint folder models/<name>/, so it must be one "
            "folder name: no '/', '\\', '..' or absolute path"
            + ("; pass name='...' to launch under another name" if parameter == "task_id" else ""),
        )


class Checkpoint:
    """The checkpoint directory of one task."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @property
    def model_path(self) -> Path:
        return self.directory / "model.pt"

    def save(
        self,
        state: dict[str, torch.Tensor],
        round: int,
        history: list[dict[str, Any]],
        task_id: str,
        code_hash: str = "",
        finished: bool = False,
        strategy: Strategy | None = None,
    ) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._save_tensors("model.pt", state)
        learned = strategy.state_dict() if strategy is not None else {}
        if learned:
            self._save_tensors("strategy.pt", learned)
        else:
            (self.directory / "strategy.pt").unlink(missing_ok=True)
        self._write("history.json", json.dumps(history, indent=1).encode())
        self._write("history.csv", _csv(history).encode())
        self._write(
            "checkpoint.json",
            json.dumps(
                {
                    "task_id": task_id,
                    "round": round,
                    "code_hash": code_hash,
                    "finished": finished,
                    "strategy": strategy.describe() if strategy is not None else None,
                }
            ).encode(),
        )

    def restore_strategy(self, strategy: Strategy) -> bool:
        """Give ``strategy`` what it had learned by the saved round (FedAdam's moments, say).

        Only a strategy with the saved one's very name and parameters takes
        it; another starts afresh. Returns whether it took saved state.
        """
        path = self.directory / "strategy.pt"
        try:
            meta = json.loads((self.directory / "checkpoint.json").read_text())
        except (OSError, ValueError):
            return False
        if not path.is_file() or meta.get("strategy") != strategy.describe():
            return False
        strategy.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return True

    def exists(self) -> bool:
        return (self.directory / "checkpoint.json").is_file() and self.model_path.is_file()

    def holds_unfinished_run_of(self, code_hash: str) -> bool:
        """Whether an unfinished run of this exact code saved its last round here.

        Running the same code again continues from it: nothing in the code,
        and so nothing data owners consented to, has to change to resume.
        """
        try:
            meta = json.loads((self.directory / "checkpoint.json").read_text())
        except (OSError, ValueError):
            return False
        return (
            isinstance(meta, dict)
            and meta.get("code_hash") == code_hash
            and meta.get("finished") is False
            and isinstance(meta.get("round"), int)
            and meta["round"] > 0
            and self.model_path.is_file()
        )

    def load(self) -> tuple[dict[str, torch.Tensor], int, list[dict[str, Any]]]:
        """The saved state, the round it ends and the history so far."""
        meta = json.loads((self.directory / "checkpoint.json").read_text())
        state = torch.load(self.model_path, map_location="cpu", weights_only=True)
        history_path = self.directory / "history.json"
        history = json.loads(history_path.read_text()) if history_path.is_file() else []
        return state, int(meta["round"]), history

    def _save_tensors(self, name: str, state: dict[str, torch.Tensor]) -> None:
        with atomically(self.directory / name) as temporary:  # no copy in memory first
            torch.save({key: tensor.detach().cpu() for key, tensor in state.items()}, temporary)

    def _write(self, name: str, data: bytes) -> None:
        write_atomically(self.directory / name, data)


@contextlib.contextmanager
def atomically(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to, renamed into place once written,
    so a reader never finds a half-written file (nor a stray one when writing fails)."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` :func:`atomically`."""
    with atomically(path) as temporary:
        temporary.write_bytes(data)


def _csv(history: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in history:
        columns.extend(key for key in row if key not in columns)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({key: _cell(value) for key, value in row.items()} for row in history)
    return out.getvalue()


def _cell(value: Any) -> Any:
    return ";".join(map(str, value)) if isinstance(value, (list, tuple)) else value
