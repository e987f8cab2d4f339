"""What a party needs of its connection to a task, whatever carries it.

The round loop and the participant runtime speak to a :class:`Transport`:
:class:`~fedmagic.wire.link.Link` carries it over a websocket to a relay;
:class:`~fedmagic.wire.memory.MemoryRelay` carries it between coroutines of
one process, with the relay's routing, for fast tests and simulations.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Mapping

from .frames import Frame

if TYPE_CHECKING:
    import torch

__all__ = ["Transport"]


class Transport(abc.ABC):
    """One party's authenticated connection to a task.

    What every transport does alike is here (the session, streaming a state
    dict, what a reconnect says); each says how it sends, receives, closes
    and connects again.
    """

    #: Where the connection goes, for messages.
    url: str
    #: The relay's welcome: the task, and a participant's node and session.
    welcome: Frame
    #: The hello this party said, which a reconnect says again.
    _hello: dict[str, Any]

    @property
    def session(self) -> str | None:
        """The secret a participant presents to take its place back after a reconnect.

        None for an initiator.
        """
        session = self.welcome.header.get("session")
        return session if isinstance(session, str) else None

    @abc.abstractmethod
    async def send(self, frame: Frame) -> None:
        """Send one frame; raises ConnectionLost if the connection is gone."""

    async def send_state(self, state: Mapping[str, torch.Tensor], **fields: Any) -> None:
        """Stream a state dict tensor by tensor, in bounded frames."""
        from .codec import encode_state  # torch: only for the parties that hold tensors

        for frame in encode_state(state, **fields):
            await self.send(frame)

    @abc.abstractmethod
    async def recv(self) -> Frame:
        """The next frame; raises ConnectionLost when closed, RelayRefused on a relay's error."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def reopen(self, wait: float, **hello: Any) -> Transport:
        """Connect again as the same party, after this connection was lost.

        A participant presents its session, so it takes its own name back on
        the same relay or on a restarted one.

        Args:
            wait: keep trying this long (the relay restarting, the task not
                back yet).
            hello: fields to add to the first hello.

        Raises:
            RelayRefused: if the relay is still unreachable after ``wait``, or says no.
        """
        again = {**self._hello, **hello}
        if self.session is not None:
            again["session"] = self.session
        return await self._hello_again(again, wait)

    @abc.abstractmethod
    async def _hello_again(self, hello: dict[str, Any], wait: float) -> Transport:
        """Connect anew with ``hello``, trying for ``wait`` seconds."""
