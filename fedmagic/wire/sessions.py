"""A participant's session secrets, kept on its own disk.

The relay gives each participant a secret at its first join. A node that
restarts (after freezing, say) presents it to take its name back at once,
replacing its stale connection; without it, the name stays taken. Secrets
live in ``.fedmagic/sessions/`` under the node's working directory, readable
by its owner only, one file per relay, task and node name.
"""

from __future__ import annotations

import hashlib
import os
import ssl as ssl_module
from pathlib import Path

from .link import Link

__all__ = ["join_relay", "load_session", "save_session"]

DIRECTORY = Path(".fedmagic") / "sessions"


def _path(url: str, task: str, node: str) -> Path:
    key = hashlib.sha256("\0".join((url, task, node)).encode()).hexdigest()[:32]
    return DIRECTORY / key


def load_session(url: str, task: str, node: str) -> str | None:
    """The secret this node got from this relay for this task, if it kept one."""
    try:
        secret = _path(url, task, node).read_text().strip()
    except OSError:
        return None
    return secret or None


def save_session(url: str, task: str, node: str, secret: str | None) -> None:
    """Keep ``secret`` for a restart; a node that cannot write its disk just goes without."""
    if not secret:
        return
    path = _path(url, task, node)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secret)
    except OSError:
        pass


async def join_relay(
    url: str,
    task: str,
    token: str,
    node: str,
    *,
    wait: float,
    ssl: ssl_module.SSLContext | None = None,
) -> Link:
    """Open a participant's link, presenting this node's session and keeping the new one."""
    link = await Link.open(
        url,
        role="participant",
        task=task,
        token=token,
        node=node,
        wait=wait,
        ssl=ssl,
        session=load_session(url, task, node),
    )
    save_session(url, task, node, link.session)
    return link
