"""Which party's code runs, when several share a process: set in each one's coroutine."""

import contextvars

NODE: contextvars.ContextVar[str] = contextvars.ContextVar("party_node")
