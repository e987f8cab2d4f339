"""The wire format: frames, state streaming, and what the reader refuses."""

from __future__ import annotations

import array
import math
import re
import struct

import msgpack
import pytest
import torch

from fedmagic.wire.codec import (CHUNK_BYTES, DTYPES, MAX_HEADER_BYTES, MAX_LOG_SIZE, Frame, Kind,
                            StateReader, encode_state, tensor_bytes)
from fedmagic.errors import CodecError, ConfigurationError


# Helpers.

def raw_bits(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of arbitrary bit patterns (NaN payloads included for floats)."""
    generator = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    data = torch.randint(0, 256, (count * itemsize,), dtype=torch.uint8, generator=generator)
    return data.view(dtype).reshape(shape)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in C order, to compare bit for bit."""
    return tensor.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def wire(state, *, chunk_bytes: int = 1000, **fields) -> list[Frame]:
    """Frames as a peer receives them: serialized, then parsed."""
    return [Frame.parse(frame.serialize())
            for frame in encode_state(state, chunk_bytes=chunk_bytes, **fields)]


def receive(frames: list[Frame], reader: StateReader | None = None) -> dict[str, torch.Tensor]:
    reader = reader if reader is not None else StateReader()
    for frame in frames[:-1]:
        reader.feed(frame)
    return reader.finish(frames[-1])


def encoded(header: object, payload: bytes = b"") -> bytes:
    """Bytes of a frame whose header is any msgpack object, valid or not."""
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed + payload


def state_frame(pieces: object, payload: bytes = b"") -> Frame:
    header = {"t": "state"} if pieces is None else {"t": "state", "pieces": pieces}
    return Frame.parse(Frame(header, payload).serialize())


def state_end(count: int) -> Frame:
    return Frame.parse(Frame({"t": "state_end", "count": count}).serialize())


FLOAT = struct.pack("<2f", 1.0, 2.0)  # the bytes of torch.tensor([1.0, 2.0])


def assert_same_tensor(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert torch.equal(bits(got), bits(want))


# Round trips.

LAYOUTS = {
    "0-d": lambda dtype: raw_bits(dtype, ()),
    "empty": lambda dtype: raw_bits(dtype, (0, 3)),
    "transposed": lambda dtype: raw_bits(dtype, (5, 7)).t(),
    "step-sliced": lambda dtype: raw_bits(dtype, (9, 10))[::2, 1::3],
    "several-chunks": lambda dtype: raw_bits(dtype, (3001,)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_every_dtype_round_trips_bit_exactly(dtype_name, layout):
    # Prepare
    tensor = LAYOUTS[layout](DTYPES[dtype_name])
    # Execute
    state = receive(wire({"x": tensor}, chunk_bytes=1000))
    # Assert
    assert list(state) == ["x"]
    assert_same_tensor(state["x"], tensor)
    assert state["x"].is_contiguous()


def test_float_nan_payloads_and_negative_zero_round_trip_bit_exactly():
    # Prepare
    patterns = [0x7FC00000, 0x7FC00001, 0xFFC0BEEF, 0x7F800001, 0x80000000, 0x7F800000]
    tensor = torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)
    # Execute
    state = receive(wire({"x": tensor}))
    # Assert
    assert state["x"].view(torch.int32).tolist() == tensor.view(torch.int32).tolist()


def test_tensor_larger_than_chunk_bytes_is_cut_across_several_frames():
    # Prepare
    tensor = raw_bits(torch.float32, (1000,))  # 4000 bytes
    # Execute
    frames = wire({"big": tensor}, chunk_bytes=1000, round=4)
    state = receive(frames)
    # Assert
    assert [frame.kind for frame in frames] == ["state"] * 4 + ["state_end"]
    assert [frame.header["pieces"] for frame in frames[:-1]] == [
        [["big", "float32", [1000], start, start + 1000]] for start in range(0, 4000, 1000)]
    assert all(frame.header["round"] == 4 for frame in frames)
    assert frames[-1].header == {"t": "state_end", "round": 4, "count": 1, "bytes": 4000}
    assert_same_tensor(state["big"], tensor)


def test_small_tensors_share_one_frame():
    # Prepare
    tensors = {"a": raw_bits(torch.float32, (3,)), "b": raw_bits(torch.int64, (2, 2), seed=1),
               "c": raw_bits(torch.bfloat16, (), seed=2)}
    # Execute
    frames = wire(tensors, chunk_bytes=1000)
    state = receive(frames)
    # Assert
    assert [frame.kind for frame in frames] == ["state", "state_end"]
    assert frames[0].header["pieces"] == [["a", "float32", [3], 0, 12],
                                          ["b", "int64", [2, 2], 0, 32],
                                          ["c", "bfloat16", [], 0, 2]]
    assert frames[0].payload_size == 46
    for name, tensor in tensors.items():
        assert_same_tensor(state[name], tensor)


def test_tensor_straddling_a_chunk_boundary_is_split_between_frames():
    # Prepare
    tensors = {"a": raw_bits(torch.uint8, (700,)), "b": raw_bits(torch.uint8, (700,), seed=1)}
    # Execute
    frames = wire(tensors, chunk_bytes=1000)
    state = receive(frames)
    # Assert
    assert [frame.header["pieces"] for frame in frames[:-1]] == [
        [["a", "uint8", [700], 0, 700], ["b", "uint8", [700], 0, 300]],
        [["b", "uint8", [700], 300, 700]]]
    for name, tensor in tensors.items():
        assert_same_tensor(state[name], tensor)


def test_empty_state_dict_is_a_lone_state_end():
    # Execute
    frames = wire({})
    # Assert
    assert [frame.header for frame in frames] == [
        {"t": "state_end", "count": 0, "bytes": 0}]
    assert receive(frames) == {}


def test_conjugate_and_negative_views_travel_as_their_values():
    # Prepare
    complex_view = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj()
    negative_view = torch.tensor(1 + 2j, dtype=torch.complex64).conj().imag
    # Execute
    state = receive(wire({"c": complex_view, "n": negative_view}))
    # Assert
    assert state["c"].tolist() == [1 - 2j, 3 + 4j]
    assert state["n"].item() == -2.0


def test_requires_grad_tensor_travels_detached():
    # Prepare
    parameter = torch.nn.Parameter(torch.tensor([1.5, -2.0]))
    # Execute
    state = receive(wire({"p": parameter}))
    # Assert
    assert state["p"].tolist() == [1.5, -2.0]
    assert not state["p"].requires_grad


def test_encode_state_refuses_a_key_that_is_not_a_string():
    # Execute / Assert
    with pytest.raises(CodecError) as caught:
        list(encode_state({1: torch.zeros(1)}))
    assert str(caught.value) == "malformed state: state dict key 1 is not a string"


def test_encode_state_refuses_chunk_bytes_below_one_instead_of_looping_forever():
    # Execute / Assert
    with pytest.raises(ConfigurationError) as caught:
        next(encode_state({"w": torch.zeros(1)}, chunk_bytes=0))
    assert str(caught.value) == ("chunk_bytes=0: frames need room for at least one "
                                 "payload byte")


# Golden bytes.

GOLDEN_FRAME = bytes.fromhex(
    "00000010"                  # header length: 16
    "82"                        # map of 2
    "a174" "a5726f756e64"       # "t": "round"
    "a5726f756e64" "03"         # "round": 3
    "0102"                      # payload
)

GOLDEN_STATE = bytes.fromhex(
    "00000025"                                # header length: 37
    "83"                                      # map of 3
    "a174" "a57374617465"                     # "t": "state"
    "a5726f756e64" "01"                       # "round": 1
    "a6706965636573" "91"                     # "pieces": [
    "95" "a162" "a5696e743136" "9102" "00" "04"  # ["b", "int16", [2], 0, 4]]
    "01000200"                                # int16 1 and 2, little-endian
)

GOLDEN_STATE_END = bytes.fromhex(
    "00000022"                                # header length: 34
    "84"                                      # map of 4
    "a174" "a973746174655f656e64"             # "t": "state_end"
    "a5726f756e64" "01"                       # "round": 1
    "a5636f756e74" "01"                       # "count": 1
    "a56279746573" "04"                       # "bytes": 4
)


def test_frame_serializes_to_golden_bytes():
    # Prepare
    frame = Frame({"t": Kind.ROUND, "round": 3}, b"\x01\x02")
    # Execute
    data = frame.serialize()
    # Assert
    assert data == GOLDEN_FRAME


def test_golden_bytes_parse_to_header_and_payload():
    # Execute
    frame = Frame.parse(GOLDEN_FRAME)
    # Assert
    assert frame.header == {"t": "round", "round": 3}
    assert frame.kind == Kind.ROUND
    assert bytes(frame.payload) == b"\x01\x02"


def test_state_stream_serializes_to_golden_bytes():
    # Prepare
    state = {"b": torch.tensor([1, 2], dtype=torch.int16)}
    # Execute
    data = [frame.serialize() for frame in encode_state(state, round=1)]
    # Assert
    assert data == [GOLDEN_STATE, GOLDEN_STATE_END]


def test_golden_state_stream_decodes_to_the_tensor():
    # Execute
    state = receive([Frame.parse(GOLDEN_STATE), Frame.parse(GOLDEN_STATE_END)])
    # Assert
    assert_same_tensor(state["b"], torch.tensor([1, 2], dtype=torch.int16))


def test_parse_returns_a_view_of_the_payload_not_a_copy():
    # Prepare
    data = bytearray(GOLDEN_FRAME)
    frame = Frame.parse(data)
    # Execute
    data[-1] = 0xFF
    # Assert
    assert bytes(frame.payload) == b"\x01\xff"


def test_parse_counts_bytes_in_a_memoryview_of_wider_items():
    # Prepare
    data = Frame({"t": "a"}, b"\x01\x02\x03").serialize()  # 12 bytes: 3 uint32 items
    view = memoryview(array.array("I", data))
    # Execute
    frame = Frame.parse(view)
    # Assert
    assert frame.header == {"t": "a"}
    assert bytes(frame.payload) == b"\x01\x02\x03"


def test_list_payload_is_joined_when_serialized():
    # Prepare
    frame = Frame({"t": "x"}, [b"ab", memoryview(b"cd")])
    # Execute
    parsed = Frame.parse(frame.serialize())
    # Assert
    assert frame.payload_size == 4
    assert bytes(parsed.payload) == b"abcd"


def test_serialize_refuses_header_over_the_limit():
    # Prepare
    frame = Frame({"t": "x", "blob": b"\0" * MAX_HEADER_BYTES})
    # Execute / Assert
    with pytest.raises(CodecError, match=r"^malformed outgoing frame: header of \d+ bytes "
                                         r"exceeds the limit of 1048576 bytes$"):
        frame.serialize()


# Hostile frames.

HOSTILE_FRAMES = {
    "text message": (
        "hello",
        "malformed frame: got a text message; fedmagic speaks binary frames only"),
    "fewer than 4 bytes": (
        b"\x00\x00\x01",
        "malformed frame: 3 bytes is shorter than the 4-byte header length"),
    "empty message": (
        b"",
        "malformed frame: 0 bytes is shorter than the 4-byte header length"),
    "header length over the limit": (
        struct.pack(">I", MAX_HEADER_BYTES + 1),
        "malformed frame: header of 1048577 bytes exceeds the limit of 1048576 bytes"),
    "header length past the end": (
        b"\x00\x00\x00\x10\x81",
        "malformed frame: header claims 16 bytes but only 1 follow"),
    "header not a map": (
        encoded([1, 2]),
        "malformed frame: header must be a map with a string field 't'"),
    "header without 't'": (
        encoded({"round": 1}),
        "malformed frame: header must be a map with a string field 't'"),
    "header whose 't' is not a string": (
        encoded({"t": 3}),
        "malformed frame: header must be a map with a string field 't'"),
    "msgpack ext type": (
        encoded({"t": "x", "e": msgpack.ExtType(5, b"ab")}),
        "malformed frame: msgpack extension type 5 is not allowed in a header"),
    "msgpack timestamp": (
        encoded({"t": "x", "when": msgpack.Timestamp(1)}),
        "malformed frame: msgpack extension type -1 (timestamp) is not allowed in a header"),
    "msgpack timestamp in a list": (
        encoded({"t": "x", "when": [1, msgpack.Timestamp(1)]}),
        "malformed frame: msgpack extension type -1 (timestamp) is not allowed in a header"),
    "binary map key": (
        encoded({"t": "x", b"k": 1}),
        "malformed frame: header map key b'k' is not a string"),
    "nested binary map key": (
        encoded({"t": "x", "n": {b"k": 1}}),
        "malformed frame: header map key b'k' is not a string"),
}


@pytest.mark.parametrize("case", HOSTILE_FRAMES)
def test_parse_refuses_hostile_frame_naming_what_is_wrong(case):
    # Prepare
    data, message = HOSTILE_FRAMES[case]
    # Execute / Assert
    with pytest.raises(CodecError) as caught:
        Frame.parse(data)
    assert str(caught.value) == message


MSGPACK_ERRORS = {
    "not msgpack": (struct.pack(">I", 1) + b"\xc1", "header is not valid msgpack"),
    "truncated msgpack": (struct.pack(">I", 2) + b"\x82\xa1", "header is not valid msgpack"),
    "zero-length header": (struct.pack(">I", 0), "header is not valid msgpack"),
    "extra bytes in header": (struct.pack(">I", 6) + b"\x81\xa1t\xa1x\xc0",
                              "header is not valid msgpack"),
    "integer map key": (encoded({"t": "x", 1: 2}),
                        "int is not allowed for map key"),
    "nested integer map key": (encoded({"t": "x", "n": {1: 2}}),
                               "int is not allowed for map key"),
}


@pytest.mark.parametrize("case", MSGPACK_ERRORS)
def test_parse_refuses_invalid_msgpack_header(case):
    # Prepare
    data, fragment = MSGPACK_ERRORS[case]
    # Execute / Assert
    with pytest.raises(CodecError, match=r"^malformed frame: header is not valid msgpack \(") \
            as caught:
        Frame.parse(data)
    assert fragment in str(caught.value)


def test_parse_honours_a_lower_header_limit():
    # Prepare
    data = encoded({"t": "x", "pad": "y" * 100})
    # Execute / Assert
    with pytest.raises(CodecError) as caught:
        Frame.parse(data, max_header_bytes=64)
    assert str(caught.value) == "malformed frame: header of 111 bytes exceeds the limit of 64 bytes"


# Hostile state frames.

BAD_PIECES = {
    "pieces missing": (
        None, b"",
        "malformed state frame: 'pieces' must be a list"),
    "pieces not a list": (
        {"w": 1}, b"",
        "malformed state frame: 'pieces' must be a list"),
    "piece of 4 items": (
        [["w", "float32", [2], 0]], b"",
        "malformed state frame: each piece must be [name, dtype, shape, start, stop]"),
    "piece not a list": (
        ["w"], b"",
        "malformed state frame: each piece must be [name, dtype, shape, start, stop]"),
    "name not a string": (
        [[7, "float32", [2], 0, 8]], FLOAT,
        "malformed state frame: tensor name 7 is not a string"),
    "unknown dtype": (
        [["w", "float128", [2], 0, 8]], FLOAT,
        "malformed state frame: tensor 'w' has unknown dtype 'float128'"),
    "dtype not a string": (
        [["w", 5, [2], 0, 8]], FLOAT,
        "malformed state frame: tensor 'w' has unknown dtype 5"),
    "negative dimension": (
        [["w", "float32", [-2], 0, 8]], FLOAT,
        "malformed state frame: tensor 'w' has invalid shape [-2]"),
    "shape not a list": (
        [["w", "float32", 2, 0, 8]], FLOAT,
        "malformed state frame: tensor 'w' has invalid shape 2"),
    "dimension not an integer": (
        [["w", "float32", [2.0], 0, 8]], FLOAT,
        "malformed state frame: tensor 'w' has invalid shape [2.0]"),
    "stop before start": (
        [["w", "float32", [2], 8, 0]], b"",
        "malformed state frame: tensor 'w' has invalid byte range 8:0"),
    "negative start": (
        [["w", "float32", [2], -4, 4]], FLOAT[:4],
        "malformed state frame: tensor 'w' has invalid byte range -4:4"),
    "first piece not at byte 0": (
        [["w", "float32", [2], 4, 8]], FLOAT[4:],
        "malformed state frame: tensor 'w': piece starts at byte 4, expected 0"),
    "pieces out of order": (
        [["w", "float32", [2], 0, 2], ["w", "float32", [2], 4, 8]], FLOAT[:6],
        "malformed state frame: tensor 'w': piece starts at byte 4, expected 2"),
    "piece past the tensor's end": (
        [["w", "float32", [2], 0, 12]], FLOAT + b"\0" * 4,
        "malformed state frame: tensor 'w': piece ends at byte 12, past its 8 bytes"),
    "payload shorter than the pieces": (
        [["w", "float32", [2], 0, 8]], FLOAT[:4],
        "malformed state frame: pieces describe more than the 4 payload bytes"),
    "payload longer than the pieces": (
        [["w", "float32", [2], 0, 4]], FLOAT,
        "malformed state frame: 4 payload bytes are not described by any piece"),
    "dtype changed between pieces": (
        [["w", "float32", [2], 0, 4], ["w", "int32", [2], 4, 8]], FLOAT,
        "malformed state frame: tensor 'w' changed dtype or shape between pieces"),
    "shape changed between pieces": (
        [["w", "float32", [2], 0, 4], ["w", "float32", [1, 2], 4, 8]], FLOAT,
        "malformed state frame: tensor 'w' changed dtype or shape between pieces"),
}


@pytest.mark.parametrize("case", BAD_PIECES)
def test_reader_refuses_malformed_piece_naming_what_is_wrong(case):
    # Prepare
    pieces, payload, message = BAD_PIECES[case]
    frame = state_frame(pieces, payload)
    # Execute / Assert
    with pytest.raises(CodecError) as caught:
        StateReader().feed(frame)
    assert str(caught.value) == message


def test_reader_refuses_a_tensor_sent_twice():
    # Prepare
    reader = StateReader()
    reader.feed(state_frame([["w", "float32", [2], 0, 8]], FLOAT))
    # Execute / Assert
    with pytest.raises(CodecError) as caught:
        reader.feed(state_frame([["w", "float32", [2], 0, 8]], FLOAT))
    assert str(caught.value) == ("malformed state frame: tensor 'w': piece starts at byte 0, "
                                 "expected 8")


def test_finish_refuses_incomplete_tensor():
    # Prepare
    reader = StateReader()
    reader.feed(state_frame([["w", "float32", [2], 0, 4]], FLOAT[:4]))
    # Execute / Assert
    with pytest.raises(CodecError) as caught:
        reader.finish(state_end(1))
    assert str(caught.value) == ("malformed state: tensors ['w'] ended before all their "
                                 "bytes arrived")


@pytest.mark.parametrize("count", [0, 2, None, "1"])
def test_finish_refuses_wrong_tensor_count(count):
    # Prepare
    reader = StateReader()
    reader.feed(state_frame([["w", "float32", [2], 0, 8]], FLOAT))
    # Execute / Assert
    with pytest.raises(CodecError) as caught:
        reader.finish(state_end(count))
    assert str(caught.value) == (f"malformed state: state_end announces {count} tensors "
                                 "but 1 arrived")


# Readers that know what to expect.

EXPECTED = {"w": torch.zeros(2), "b": torch.zeros((), dtype=torch.int64)}


def test_reader_with_expected_accepts_the_expected_state():
    # Prepare
    sent = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(7)}
    # Execute
    state = receive(wire(sent), StateReader(EXPECTED))
    # Assert
    assert state.keys() == sent.keys()
    for name, tensor in sent.items():
        assert_same_tensor(state[name], tensor)


@pytest.mark.parametrize("sent, message", [
    ({"x": torch.zeros(2)},
     "malformed state: unexpected tensor 'x'; expected only w, b"),
    ({"w": torch.zeros(2, dtype=torch.float64)},
     "malformed state: tensor 'w' has dtype float64, expected float32"),
    ({"w": torch.zeros(3)},
     "malformed state: tensor 'w' has shape (3,), expected (2,)"),
    ({"b": torch.zeros(1, dtype=torch.int64)},
     "malformed state: tensor 'b' has shape (1,), expected ()"),
], ids=["unexpected name", "wrong dtype", "wrong shape", "wrong rank"])
def test_reader_with_expected_refuses_a_mismatch(sent, message):
    # Prepare
    frames = wire(sent)
    # Execute / Assert
    with pytest.raises(CodecError) as caught:
        StateReader(EXPECTED).feed(frames[0])
    assert str(caught.value) == message


def test_reader_with_expected_refuses_a_missing_tensor():
    # Prepare
    frames = wire({"w": torch.zeros(2)})
    reader = StateReader(EXPECTED)
    reader.feed(frames[0])
    # Execute / Assert
    with pytest.raises(CodecError) as caught:
        reader.finish(frames[1])
    assert str(caught.value) == "malformed state: missing tensors ['b']"


def test_reader_lists_at_most_eight_expected_names():
    # Prepare
    expected = {f"layer{i}": torch.zeros(1) for i in range(10)}
    frames = wire({"other": torch.zeros(1)})
    # Execute / Assert
    with pytest.raises(CodecError) as caught:
        StateReader(expected).feed(frames[0])
    assert str(caught.value).endswith("layer6, layer7 and 2 more")


@pytest.mark.timeout(5)
def test_reader_refuses_header_claiming_more_than_max_bytes_before_allocating():
    # Prepare
    frame = state_frame([["huge", "float32", [1 << 40], 0, 0]])
    reader = StateReader(max_bytes=1000)
    # Execute / Assert
    with pytest.raises(CodecError) as caught:
        reader.feed(frame)
    assert str(caught.value) == ("malformed state: tensor 'huge' would bring the state to "
                                 "4398046511104 bytes, over the limit of 1000")
    assert reader.tensors == {}


def test_reader_counts_max_bytes_across_tensors():
    # Prepare
    frame = state_frame([["a", "uint8", [600], 0, 0], ["b", "uint8", [600], 0, 0]])
    reader = StateReader(max_bytes=1000)
    # Execute / Assert
    with pytest.raises(CodecError) as caught:
        reader.feed(frame)
    assert str(caught.value) == ("malformed state: tensor 'b' would bring the state to "
                                 "1200 bytes, over the limit of 1000")
    assert list(reader.tensors) == ["a"]


def test_reader_refuses_many_dimensions_whose_product_exceeds_max_bytes():
    # Prepare
    frame = state_frame([["w", "float64", [1 << 40] * 64, 0, 0]])
    # Execute / Assert
    with pytest.raises(CodecError, match="over the limit of 68719476736$"):
        StateReader().feed(frame)


# Reused buffers.

def test_reader_writes_into_the_given_out_buffers():
    # Prepare
    out: dict[str, torch.Tensor] = {}
    first = receive(wire({"w": torch.tensor([1.0, 2.0])}), StateReader(out=out))
    pointer = out["w"].data_ptr()
    # Execute
    second = receive(wire({"w": torch.tensor([3.0, 4.0])}), StateReader(out=out))
    # Assert
    assert second["w"].data_ptr() == pointer
    assert out["w"] is first["w"] is second["w"]
    assert second["w"].tolist() == [3.0, 4.0]


def test_reader_replaces_an_out_buffer_it_cannot_fill_in_place():
    # Prepare
    transposed = torch.zeros(3, 2).t()
    out = {"w": transposed}
    sent = torch.arange(6.0).reshape(2, 3)
    # Execute
    state = receive(wire({"w": sent}), StateReader(out=out))
    # Assert
    assert_same_tensor(state["w"], sent)
    assert out["w"] is state["w"]
    assert out["w"] is not transposed


def test_reader_keeps_out_buffers_on_cpu_when_expected_lives_elsewhere():
    # Prepare
    expected = {"w": torch.zeros(2, device="meta")}
    out: dict[str, torch.Tensor] = {}
    receive(wire({"w": torch.tensor([1.0, 2.0])}), StateReader(expected, out=out))
    pointer = out["w"].data_ptr()
    # Execute
    state = receive(wire({"w": torch.tensor([3.0, 4.0])}), StateReader(expected, out=out))
    # Assert
    assert state["w"].device.type == "meta"
    assert out["w"].device.type == "cpu"
    assert out["w"].data_ptr() == pointer
    assert out["w"].tolist() == [3.0, 4.0]


# Logging and tensor bytes.

def test_frame_str_never_includes_the_payload():
    # Prepare
    frame = Frame({"t": Kind.STATE, "round": 3}, b"SECRET-WEIGHTS")
    # Execute
    text = str(frame)
    # Assert
    assert text == "state(round=3) +14 bytes"


def test_frame_str_without_payload_has_no_size():
    # Execute / Assert
    assert str(Frame({"t": "hello", "node": "a"})) == "hello(node='a')"


def test_frame_str_shortens_long_header_values():
    # Prepare
    frame = Frame({"t": "error", "message": "x" * 1000})
    # Execute
    text = str(frame)
    # Assert
    assert text == "error(message='" + "x" * (MAX_LOG_SIZE - 4) + "...)"


def test_frame_str_keeps_a_hostile_header_on_one_short_line():
    # Prepare
    header = {"t": "ro\nund", "k\nFORGED LOG LINE": 1, "k" * 500: 2}
    header.update({f"field{i}": i for i in range(100)})
    frame = Frame.parse(Frame(header).serialize())
    # Execute
    text = str(frame)
    # Assert
    assert "\n" not in text
    assert text.startswith("'ro\\nund'('k\\nFORGED LOG LINE'=1, kkkk")
    assert text.endswith(", ... 90 more)")
    assert len(text) < 20 * MAX_LOG_SIZE


def test_tensor_bytes_are_the_c_order_bytes():
    # Prepare
    tensor = torch.tensor([[1, 2], [3, 4]], dtype=torch.int16).t()
    # Execute
    data = tensor_bytes(tensor)
    # Assert
    assert bytes(data) == struct.pack("<4h", 1, 3, 2, 4)


def test_tensor_bytes_refuses_an_unsupported_dtype():
    # Prepare
    tensor = torch.zeros(2, dtype=torch.float8_e4m3fnuz)
    # Execute / Assert
    with pytest.raises(CodecError) as caught:
        tensor_bytes(tensor)
    assert str(caught.value) == ("malformed tensor: dtype torch.float8_e4m3fnuz cannot travel; "
                                 "supported: " + ", ".join(DTYPES))


def test_dtype_names_are_torch_names_without_prefix():
    # Assert
    assert all(str(dtype) == f"torch.{name}" for name, dtype in DTYPES.items())
    assert re.fullmatch(r"[a-z0-9_, ]+", ", ".join(DTYPES))


@pytest.mark.slow
def test_state_larger_than_2_gib_streams_in_bounded_frames_and_round_trips():
    big = torch.empty((1 << 31) + 4096, dtype=torch.uint8)  # more bytes than an int32 counts
    markers = torch.arange(0, big.numel(), 1 << 20)
    big[markers] = (markers % 251).to(torch.uint8)
    big[-7:] = torch.arange(7, dtype=torch.uint8)
    state = {"big": big, "small": torch.arange(10.0)}
    reader = StateReader()
    largest = 0

    for frame in encode_state(state):  # one frame in memory at a time
        data = frame.serialize()
        largest = max(largest, len(data))
        parsed = Frame.parse(data)
        if parsed.kind == Kind.STATE_END:
            received = reader.finish(parsed)
        else:
            reader.feed(parsed)

    assert largest <= CHUNK_BYTES + 4096
    assert torch.equal(received["big"][markers], big[markers])
    assert torch.equal(received["big"][-7:], torch.arange(7, dtype=torch.uint8))
    assert torch.equal(received["small"], torch.arange(10.0))
