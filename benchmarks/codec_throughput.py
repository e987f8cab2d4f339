"""Codec throughput on a 1 GiB state dict, against a plain memory copy.

Encode: state dict -> serialized frames (what goes on the wire).
Decode: frames -> a state dict, in the receive buffers a receiver keeps from one
round to the next (the aggregator's staging, a participant's inbox); "cold"
decodes into freshly allocated tensors, as a receiver's first round does.
Memory copy: the same bytes copied once into buffers already in memory.
Prints GB/s for each and the ratios; the target is codec >= 0.5 x memory copy.
"""

import argparse
import time

import torch
from harness import make_state

from fedmagic.wire.codec import Frame, StateReader, encode_state


def best_of(runs: int, work) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    state = make_state(int(options.gib * (1 << 30)), bias=True)
    size = sum(t.numel() * t.element_size() for t in state.values())
    frames = [frame.serialize() for frame in encode_state(state)]

    copies = {name: torch.zeros_like(tensor) for name, tensor in state.items()}
    inbox: dict[str, torch.Tensor] = {}

    def memory_copy() -> None:
        for name, tensor in state.items():
            copies[name].copy_(tensor)

    def encode() -> None:
        for frame in encode_state(state):
            frame.serialize()

    def decode(out: dict[str, torch.Tensor] | None = None) -> None:
        reader = StateReader(out=out)
        for data in frames[:-1]:
            reader.feed(Frame.parse(data))
        reader.finish(Frame.parse(frames[-1]))

    cold = best_of(1, decode)
    timings = {name: best_of(options.runs, work) for name, work in
               [("memory copy", memory_copy), ("encode", encode),
                ("decode", lambda: decode(inbox))]}
    print(f"state dict: {size / 1e9:.2f} GB in {len(state)} tensors, {len(frames)} frames; "
          f"torch threads {torch.get_num_threads()}")
    for name, seconds in timings.items():
        print(f"{name:>12}: {size / seconds / 1e9:6.2f} GB/s ({seconds:.3f} s)")
    print(f"{'cold decode':>12}: {size / cold / 1e9:6.2f} GB/s ({cold:.3f} s), into new tensors")
    for name in ("encode", "decode"):
        ratio = timings["memory copy"] / timings[name]
        print(f"{name} / memory copy: {ratio:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
