"""A 1 GiB state dict through the relay to 3 participants and back, against plain TCP.

fedmagic: the initiator streams the state through a ``fedmagic relay`` process,
which fans it out to 3 participant processes; then, as the aggregator does,
it asks each participant in turn for its state back and reads it into its
staging buffers. Plain TCP: the same bytes, the same pattern (one upload
fanned out to 3 by a forwarding process, 3 sent back through it), over raw
sockets with no framing at all. The runs alternate (TCP, fedmagic with the relay's
default limits, fedmagic with its byte rate limit lifted), so a busy machine
slows all alike; prints each one's median and the ratios (target: fedmagic at
most 4x plain TCP). The default limit reads each connection at 512 MiB/s at
most (256 MiB burst), which is what most of the gap to the unlimited relay is.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time

import torch
from harness import free_port, make_state

from fedmagic.wire.codec import Frame, Kind, StateReader
from fedmagic.wire.link import Link

PARTICIPANTS = 3
CHUNK = 4 << 20


# fedmagic through the relay.

async def participant(url: str, token: str, node: str, gib: float) -> None:
    # Receive buffers already in memory, as from the second round on.
    inbox = {name: torch.zeros_like(t) for name, t in make_state(int(gib * (1 << 30))).items()}
    link = await Link.open(url, role="participant", task="bench", token=token, node=node,
                           wait=60)
    reader = StateReader(inbox, out=inbox)
    while True:
        frame = await link.recv()
        if frame.kind == Kind.FINISH:
            break
        if frame.kind == Kind.STATE:
            reader.feed(frame)
        elif frame.kind == Kind.STATE_END:
            state = reader.finish(frame)
            reader = StateReader(inbox, out=inbox)
        elif frame.kind == Kind.UPLOAD:
            await link.send_state(state, round=1)
    await link.close()


async def initiator(url: str, token: str, state: dict[str, torch.Tensor]) -> float:
    link = await Link.open(url, role="initiator", task="bench", token=token, wait=30)
    nodes = []
    while len(nodes) < PARTICIPANTS:
        frame = await link.recv()
        if frame.kind == Kind.PEER_JOINED:
            nodes.append(frame.header["from"])
    staging = {name: torch.zeros_like(t) for name, t in state.items()}
    started = time.perf_counter()
    await link.send_state(state, to="*", round=1)
    for node in nodes:
        await link.send(Frame({"t": Kind.UPLOAD, "to": [node], "round": 1}))
        reader = StateReader(state, out=staging)
        while True:
            frame = await link.recv()
            if frame.kind == Kind.STATE_END:
                received = reader.finish(frame)
                break
            reader.feed(frame)
    seconds = time.perf_counter() - started
    assert all(torch.equal(received[name], state[name]) for name in state)
    await link.send(Frame({"t": Kind.FINISH, "to": "*", "ok": True}))
    await link.close()
    return seconds


def run_fedmagic(state: dict[str, torch.Tensor], gib: float, *relay_options: str) -> float:
    port, token = free_port(), secrets.token_urlsafe(8)
    url = f"ws://127.0.0.1:{port}"
    relay = subprocess.Popen([sys.executable, "-m", "fedmagic", "relay", "--port", str(port),
                              *relay_options],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes = [subprocess.Popen([sys.executable, __file__, "--role", "participant", "--url", url,
                               "--token", token, "--node", f"node-{i}", "--gib", str(gib)])
             for i in range(PARTICIPANTS)]
    try:
        return asyncio.run(initiator(url, token, state))
    finally:
        for process in nodes:
            process.wait(timeout=60)
        relay.send_signal(signal.SIGINT)
        relay.wait(timeout=30)


# Plain TCP with a forwarding hop.

def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        got = sock.recv_into(view, min(view.nbytes, CHUNK))
        if not got:
            raise ConnectionError("peer closed early")
        view = view[got:]


def connect(port: int) -> socket.socket:
    """Connect to the forwarder once it listens (it starts in its own process)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            connection = socket.create_connection(("127.0.0.1", port))
            connection.settimeout(120)
            return connection
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def forwarder(port: int, size: int) -> None:
    with socket.create_server(("127.0.0.1", port)) as server:
        server.settimeout(120)
        peers = [server.accept()[0] for _ in range(PARTICIPANTS + 1)]
        for peer in peers:
            peer.settimeout(120)
        roles = {}
        for peer in peers:
            roles[peer.recv(1)] = peer
        source = roles[b"I"]
        source.sendall(b"r")  # every sink is connected, its buffer in memory
        sinks = [roles[str(i).encode()] for i in range(PARTICIPANTS)]
        buffer = memoryview(bytearray(CHUNK))
        for offset in range(0, size, CHUNK):  # one upload, fanned out
            chunk = buffer[:min(CHUNK, size - offset)]
            recv_exactly(source, chunk)
            for sink in sinks:
                sink.sendall(chunk)
        for sink in sinks:  # each sends its copy back, in turn
            sink.sendall(b"g")
            for offset in range(0, size, CHUNK):
                chunk = buffer[:min(CHUNK, size - offset)]
                recv_exactly(sink, chunk)
                source.sendall(chunk)


def sink(port: int, index: int, size: int) -> None:
    data = memoryview(bytearray(size))  # zero-filled, so in memory before connecting
    with connect(port) as connection:
        connection.sendall(str(index).encode())
        recv_exactly(connection, data)
        recv_exactly(connection, memoryview(bytearray(1)))
        connection.sendall(data)


def run_tcp(payload: memoryview) -> float:
    port, size = free_port(), payload.nbytes
    hop = subprocess.Popen([sys.executable, __file__, "--role", "forwarder", "--port", str(port),
                            "--size", str(size)])
    sinks = [subprocess.Popen([sys.executable, __file__, "--role", "sink", "--port", str(port),
                               "--index", str(i), "--size", str(size)])
             for i in range(PARTICIPANTS)]
    back = memoryview(bytearray(size))
    with connect(port) as connection:
        connection.sendall(b"I")
        recv_exactly(connection, memoryview(bytearray(1)))
        started = time.perf_counter()
        connection.sendall(payload)
        for _ in range(PARTICIPANTS):
            recv_exactly(connection, back)
        seconds = time.perf_counter() - started
    for process in [hop, *sinks]:
        process.wait(timeout=60)
    assert back == payload
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--role", default="main")
    parser.add_argument("--url")
    parser.add_argument("--token")
    parser.add_argument("--node")
    parser.add_argument("--port", type=int)
    parser.add_argument("--index", type=int)
    parser.add_argument("--size", type=int)
    options = parser.parse_args()
    if options.role == "participant":
        asyncio.run(participant(options.url, options.token, options.node, options.gib))
        return
    if options.role == "forwarder":
        forwarder(options.port, options.size)
        return
    if options.role == "sink":
        sink(options.port, options.index, options.size)
        return
    torch.manual_seed(0)
    state = make_state(int(options.gib * (1 << 30)))
    payload = memoryview(torch.cat([t.reshape(-1) for t in state.values()])
                         .view(torch.uint8).numpy()).cast("B")
    size = payload.nbytes
    runs: dict[str, list[float]] = {"tcp": [], "fedmagic": [], "unlimited": []}
    for _ in range(options.repeat):
        runs["tcp"].append(run_tcp(payload))
        runs["fedmagic"].append(run_fedmagic(state, options.gib))
        runs["unlimited"].append(run_fedmagic(state, options.gib,
                                              "--max-mib-per-second", "1000000"))
    tcp, fed, unlimited = (statistics.median(times) for times in runs.values())
    moved = size * (1 + PARTICIPANTS)
    print(f"state dict {size / 1e9:.2f} GB, out to {PARTICIPANTS} participants and back; "
          f"median of {options.repeat} alternating runs")
    print(f"plain TCP with a forwarding hop:     {tcp:6.2f} s ({moved / tcp / 1e9:.2f} GB/s at "
          "the initiator)")
    print(f"fedmagic, relay's default limits:    {fed:6.2f} s ({moved / fed / 1e9:.2f} GB/s)")
    print(f"fedmagic, relay's byte limit lifted: {unlimited:6.2f} s "
          f"({moved / unlimited / 1e9:.2f} GB/s)")
    print(f"fedmagic / plain TCP: {fed / tcp:.2f} (target <= 4); without the byte limit "
          f"{unlimited / tcp:.2f}")


if __name__ == "__main__":
    main()
