"""Tensors on fedmagic's wire, sans I/O: state dicts to frames, and back.

Frames themselves (``Frame``, ``Kind``, the header limits) live in
``frames``, which needs no torch; they are re-exported here.

Tensors travel as dtype name + shape + raw bytes, never pickled. A state
dict streams as ``state`` frames of at most ``chunk_bytes`` of payload each
(small tensors share a frame, large ones are cut), closed by ``state_end``.
Nothing here touches a socket: the relay and the links feed it bytes.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from ..errors import CodecError, ConfigurationError
from .frames import CHUNK_BYTES, MAX_HEADER_BYTES, MAX_LOG_SIZE, PROTOCOL_VERSION, Frame, Kind

__all__ = [
    "CHUNK_BYTES",
    "DTYPES",
    "Frame",
    "Kind",
    "MAX_HEADER_BYTES",
    "MAX_LOG_SIZE",
    "MAX_STATE_BYTES",
    "PROTOCOL_VERSION",
    "StateReader",
    "encode_state",
    "tensor_bytes",
]

#: Largest state dict a reader allocates when it has no model to compare with.
MAX_STATE_BYTES = 64 << 30

DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.bool,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    )
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw bytes, C order, from CPU memory; no copy when possible."""
    if tensor.dtype not in _DTYPE_NAMES:
        raise CodecError(
            f"dtype {tensor.dtype} cannot travel; supported: {', '.join(DTYPES)}", "tensor"
        )
    flat = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    # numpy's stubs declare ndarray's buffer protocol (__buffer__) for Python 3.12+ only.
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def encode_state(
    state: Mapping[str, torch.Tensor], *, chunk_bytes: int = CHUNK_BYTES, **fields: Any
) -> Iterator[Frame]:
    """Stream a state dict as ``state`` frames and a closing ``state_end``.

    ``fields`` (the round, say) are copied into every header. Each piece is
    ``[name, dtype, shape, start, stop]``: bytes ``start:stop`` of the tensor.

    Raises:
        ConfigurationError: if ``chunk_bytes`` is not positive.
        CodecError: for a key that is not a string or a dtype that cannot travel.
    """
    if chunk_bytes < 1:
        raise ConfigurationError(
            "chunk_bytes", chunk_bytes, "frames need room for at least one payload byte"
        )
    pieces: list[list[Any]] = []
    payload: list[memoryview] = []
    size = 0
    total = 0
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise CodecError(f"state dict key {name!r} is not a string", "state")
        data = tensor_bytes(tensor)
        meta = [name, _DTYPE_NAMES[tensor.dtype], list(tensor.shape)]
        start = 0
        while True:
            take = min(data.nbytes - start, chunk_bytes - size)
            pieces.append([*meta, start, start + take])
            payload.append(data[start : start + take])
            size += take
            start += take
            if size >= chunk_bytes:
                yield Frame({"t": Kind.STATE, **fields, "pieces": pieces}, payload)
                pieces, payload, size = [], [], 0
            if start >= data.nbytes:
                break
        total += data.nbytes
    if pieces:
        yield Frame({"t": Kind.STATE, **fields, "pieces": pieces}, payload)
    yield Frame({"t": Kind.STATE_END, **fields, "count": len(state), "bytes": total})


class StateReader:
    """Rebuilds a state dict from ``state`` frames, checking every piece.

    Args:
        expected: the state the sender must match (same names, dtypes and
            shapes). Tensors are moved to its devices at the end. Without it,
            any state up to ``max_bytes`` is accepted.
        out: tensors to write into instead of allocating (reused buffers).
        max_bytes: the most this reader allocates, whatever headers claim.
    """

    def __init__(
        self,
        expected: Mapping[str, torch.Tensor] | None = None,
        *,
        out: dict[str, torch.Tensor] | None = None,
        max_bytes: int = MAX_STATE_BYTES,
    ) -> None:
        self.expected = expected
        self.tensors: dict[str, torch.Tensor] = out if out is not None else {}
        self.max_bytes = max_bytes
        self._flat: dict[str, np.ndarray] = {}
        self._filled: dict[str, int] = {}
        self._allocated = 0

    def feed(self, frame: Frame) -> None:
        """Copy one ``state`` frame's pieces into place.

        Raises:
            CodecError: if a piece is malformed, out of order, or does not
                match ``expected``.
        """
        pieces = frame.header.get("pieces")
        if not isinstance(pieces, list):
            raise CodecError("'pieces' must be a list", "state frame")
        payload = memoryview(frame.payload)
        offset = 0
        for piece in pieces:
            name, dtype, shape, start, stop = _check_piece(piece)
            flat = self._target(name, dtype, shape)
            if start != self._filled[name]:
                raise CodecError(
                    f"tensor {name!r}: piece starts at byte {start}, expected {self._filled[name]}",
                    "state frame",
                )
            if stop > flat.nbytes:
                raise CodecError(
                    f"tensor {name!r}: piece ends at byte {stop}, past its {flat.nbytes} bytes",
                    "state frame",
                )
            size = stop - start
            if offset + size > payload.nbytes:
                raise CodecError(
                    f"pieces describe more than the {payload.nbytes} payload bytes", "state frame"
                )
            flat[start:stop] = np.frombuffer(payload[offset : offset + size], dtype=np.uint8)
            offset += size
            self._filled[name] = stop
        if offset != payload.nbytes:
            raise CodecError(
                f"{payload.nbytes - offset} payload bytes are not described by any piece",
                "state frame",
            )

    def finish(self, frame: Frame) -> dict[str, torch.Tensor]:
        """Check the closing ``state_end`` and return the whole state.

        Raises:
            CodecError: if tensors are missing or incomplete.
        """
        count = frame.header.get("count")
        incomplete = [
            name for name, flat in self._flat.items() if self._filled[name] != flat.nbytes
        ]
        if incomplete:
            raise CodecError(f"tensors {incomplete} ended before all their bytes arrived", "state")
        if count != len(self._flat):
            raise CodecError(
                f"state_end announces {count} tensors but {len(self._flat)} arrived", "state"
            )
        state = {name: self.tensors[name] for name in self._flat}
        if self.expected is not None:
            missing = [name for name in self.expected if name not in self._flat]
            if missing:
                raise CodecError(f"missing tensors {missing}", "state")
            for name, tensor in self.expected.items():
                if tensor.device.type != "cpu":  # the CPU buffers in self.tensors stay reusable
                    state[name] = state[name].to(tensor.device)
        return state

    def _target(self, name: str, dtype: torch.dtype, shape: list[int]) -> np.ndarray:
        if name in self._flat:
            filling = self.tensors[name]
            if filling.dtype != dtype or list(filling.shape) != shape:
                raise CodecError(
                    f"tensor {name!r} changed dtype or shape between pieces", "state frame"
                )
            return self._flat[name]
        if self.expected is not None:
            want = self.expected.get(name)
            if want is None:
                raise CodecError(
                    f"unexpected tensor {name!r}; expected only {_names(self.expected)}", "state"
                )
            if want.dtype != dtype:
                raise CodecError(
                    f"tensor {name!r} has dtype {_DTYPE_NAMES.get(dtype, dtype)}, "
                    f"expected {_DTYPE_NAMES.get(want.dtype, want.dtype)}",
                    "state",
                )
            if list(want.shape) != shape:
                raise CodecError(
                    f"tensor {name!r} has shape {tuple(shape)}, expected {tuple(want.shape)}",
                    "state",
                )
        nbytes = math.prod(shape) * _itemsize(dtype)
        if self._allocated + nbytes > self.max_bytes:
            raise CodecError(
                f"tensor {name!r} would bring the state to "
                f"{self._allocated + nbytes} bytes, over the limit of "
                f"{self.max_bytes}",
                "state",
            )
        tensor = self.tensors.get(name)
        if (
            tensor is None
            or tensor.dtype != dtype
            or list(tensor.shape) != shape
            or tensor.device.type != "cpu"
            or not tensor.is_contiguous()
        ):
            # only a contiguous CPU tensor can be filled through a flat byte view
            tensor = torch.empty(shape, dtype=dtype)
            self.tensors[name] = tensor
        self._allocated += nbytes
        flat = tensor.reshape(-1).view(torch.uint8).numpy()
        self._flat[name] = flat
        self._filled[name] = 0
        return flat


def _check_piece(piece: Any) -> tuple[str, torch.dtype, list[int], int, int]:
    if not (isinstance(piece, list) and len(piece) == 5):
        raise CodecError("each piece must be [name, dtype, shape, start, stop]", "state frame")
    name, dtype_name, shape, start, stop = piece
    if not isinstance(name, str):
        raise CodecError(f"tensor name {name!r} is not a string", "state frame")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CodecError(f"tensor {name!r} has unknown dtype {dtype_name!r}", "state frame")
    if (
        not isinstance(shape, list)
        or len(shape) > 64
        or not all(isinstance(dim, int) and 0 <= dim < 1 << 48 for dim in shape)
    ):
        raise CodecError(f"tensor {name!r} has invalid shape {shape!r}", "state frame")
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop):
        raise CodecError(
            f"tensor {name!r} has invalid byte range {start!r}:{stop!r}", "state frame"
        )
    return name, dtype, shape, start, stop


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _names(state: Mapping[str, Any]) -> str:
    names = list(state)
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
