"""The aggregator's peak memory with 8 participants, in model sizes.

A task whose model is one large float32 matrix runs 2 rounds with 8 ``fedmagic
join`` processes; the initiator runs here and a thread samples this process's
resident memory every 5 ms. Prints (peak - idle) / model size two ways: idle
measured with the model already built (what fedmagic itself adds), and idle
before the model exists (the model counted too). Target: at most 3 (a server
that keeps every update in memory, as Flower's does, needs more than 8).
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmagic import FedAvgScheduler

PAGE = os.sysconf("SC_PAGE_SIZE")


class LargeModelScheduler(FedAvgScheduler):
    """A model of ``mib`` MiB; training nudges the weights so every update differs."""

    def __init__(self, min_clients: int, max_clients: int, mib: int = 256, **rest: Any) -> None:
        super().__init__(min_clients, max_clients, **rest)
        self.mib = mib

    def make_model(self) -> nn.Module:
        side = int((self.mib * (1 << 20) // 4) ** 0.5)
        return nn.Linear(side, side, bias=False)

    def make_train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(100, 1)), batch_size=10)

    def make_test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(10, 1)), batch_size=10)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict)

    def train(self) -> None:
        with torch.no_grad():
            self.model.weight.mul_(0.999).add_(0.001)

    def test(self) -> Dict[str, Any]:
        return {"mean weight": float(self.model.weight.detach().mean())}


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = resident_bytes()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, resident_bytes())


def main() -> None:
    # Imported here: participants run this file's source, without the benchmarks folder.
    from harness import relay_with_participants

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="model size in MiB")
    parser.add_argument("--participants", type=int, default=8)
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fedmagic-memory-"))
    os.chdir(workdir)
    token = secrets.token_urlsafe(8)
    with relay_with_participants("memory", token, [workdir] * options.participants) as url:
        scheduler = LargeModelScheduler(options.participants, options.participants,
                                        mib=options.mib, max_rounds=2, log_rounds=1)
        before_model = resident_bytes()
        model = scheduler.make_model()
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        with_model = resident_bytes()
        del model
        sampler = PeakSampler()
        sampler.start()
        result = scheduler.launch_task(task_id="memory", relay=url, token=token)
        sampler.stop.set()
        sampler.join()

    assert [row["participants"] for row in result.history] == [options.participants] * 2
    peak = sampler.peak
    print(f"model {model_bytes / 2**20:.0f} MiB, {options.participants} participants, "
          f"2 rounds; aggregator peak RSS {peak / 2**20:.0f} MiB")
    print(f"(peak - idle with the model built) / model size: "
          f"{(peak - with_model) / model_bytes:.2f} (target <= 3)")
    print(f"(peak - idle before the model) / model size:     "
          f"{(peak - before_model) / model_bytes:.2f}")


if __name__ == "__main__":
    main()
