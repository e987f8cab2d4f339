"""What a party needs of its connection to a task, whatever carries it.

The round loop and the participant runtime speak to a :class:`Transport`:
:class:`~fedmagic.wire.link.Link` carries it over a websocket to a relay;
:class:`~fedmagic.wire.memory.MemoryRelay` carries it between coroutines of
one process, with the relay's routing, for fast tests and simulations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol

from .frames import Frame

if TYPE_CHECKING:
    import torch

__all__ = ["Transport"]


class Transport(Protocol):
    """One party's authenticated connection to a task."""

    #: Where the connection goes, for messages.
    url: str
    #: The relay's welcome: the task, and a participant's node and session.
    welcome: Frame

    @property
    def session(self) -> str | None:
        """The secret a participant presents to take its place back; None for an initiator."""
        ...

    async def send(self, frame: Frame) -> None:
        """Send one frame; raises ConnectionLost if the connection is gone."""
        ...

    async def send_state(self, state: Mapping[str, torch.Tensor], **fields: Any) -> None:
        """Stream a state dict tensor by tensor, in bounded frames."""
        ...

    async def recv(self) -> Frame:
        """The next frame; raises ConnectionLost when closed, RelayRefused on a relay's error."""
        ...

    async def close(self) -> None: ...

    async def reopen(self, wait: float, **hello: Any) -> Transport:
        """Connect again as the same party, trying for ``wait`` seconds."""
        ...
