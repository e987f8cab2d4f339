"""The notebook magics: a thin skin over ``launch_task`` and ``DatasetVerify``.

%load_ext fedmagic

%%fedavg_task [--wait] [--relay URL] [--token T] [--join-timeout S]
...a FedAvgScheduler subclass, then scheduler.launch_task(task_id=...)

%%dataset_verify TASK_ID
class DatasetVerify: ...

%fedavg_local 3 --task TASK_ID      # participant kernels on this machine

%fedavg_join ws://HOST:PORT --task TASK_ID --token T --node NAME   # a data owner's panel

%fedavg_simulate 1000 --partition dirichlet --alpha 0.3   # the last task, virtual participants
"""

from __future__ import annotations

import ast
import os
from typing import Any, Callable, TypeVar, cast

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..engine.context import running_code
from ..engine.simulation_options import OPTIONS, settings
from ..wire.relay import new_token
from .local import LocalParticipants
from .panel import ParticipantPanel
from .session import KernelSession

__all__ = ["FedMagics"]


Magic = TypeVar("Magic", bound=Callable[..., Any])


def simulation_arguments(magic: Magic) -> Magic:
    """``@argument`` for each of the options ``fedmagic simulate`` takes too, in their order."""
    for flag, keywords in reversed(OPTIONS):  # IPython lists the last one applied first
        magic = argument(flag, **keywords)(magic)
    return magic


@magics_class
class FedMagics(Magics):
    """``%%fedavg_task``, ``%%dataset_verify``, ``%fedavg_local``, ``%fedavg_join`` and
    ``%fedavg_simulate``.

    Args:
        session: the kernel's session, where tasks and registrations are kept.
    """

    def __init__(self, shell: Any, session: KernelSession) -> None:
        super().__init__(shell)
        self.session = session

    @property
    def _shell(self) -> Any:
        """The IPython shell the magics were registered with."""
        if self.shell is None:
            raise UsageError("fedmagic's magics are not registered with an IPython shell")
        return self.shell

    @magic_arguments()
    @argument(
        "--wait",
        action="store_true",
        help="block until the task ends and raise if it failed (scripts, headless runs); "
        "by default the task runs in the background and the cell returns at once",
    )
    @argument(
        "--relay",
        help="the relay's URL (default $FEDMAGIC_RELAY, else a relay "
        "started inside this kernel on 127.0.0.1)",
    )
    @argument(
        "--token",
        help="the join token participants present (default $FEDMAGIC_TOKEN, else a random one)",
    )
    @argument(
        "--join-timeout",
        type=float,
        help="seconds to wait for min_clients participants (default 300)",
    )
    @cell_magic
    def fedavg_task(self, line: str, cell: str) -> object:
        """Run the cell's FedAvg task; the cell is the code participants receive."""
        args = parse_argstring(self.fedavg_task, line)
        options = {"relay": args.relay, "token": args.token, "join_timeout": args.join_timeout}
        options = {key: value for key, value in options.items() if value is not None}
        filename = self._shell.compile.cache(cell)  # tracebacks show the cell's lines
        with running_code(self.session.cell(cell, filename, wait=args.wait, options=options)):
            return self._run(cell, filename)

    @magic_arguments()
    @argument("task_id", help="the task this DatasetVerify belongs to")
    @cell_magic
    def dataset_verify(self, line: str, cell: str) -> None:
        """Register the cell's ``DatasetVerify`` class: each participant runs it on its data."""
        args = parse_argstring(self.dataset_verify, line)
        filename = self._shell.compile.cache(cell)
        namespace = self._shell.user_ns
        before = namespace.get("DatasetVerify")
        self._run(cell, filename)
        verify_cls = namespace.get("DatasetVerify")
        if not isinstance(verify_cls, type) or verify_cls is before:
            raise UsageError(
                "a %%dataset_verify cell must define a class named DatasetVerify "
                "with __init__(self, task_id, current_node) and run() -> bool"
            )
        # What participants receive: engine/task.py reads these back when packing the task.
        marked = cast(Any, verify_cls)
        marked.__fedmagic_source__ = cell
        marked.__fedmagic_filename__ = filename
        self.session.verify_classes[args.task_id] = verify_cls
        print(
            f"DatasetVerify registered for task {args.task_id!r}: each participant runs it "
            "on its own data before training"
        )

    @magic_arguments()
    @argument("count", type=int, help="how many participant kernels to start")
    @argument("--task", required=True, help="the task id they join")
    @argument(
        "--relay",
        help="the relay's URL (default $FEDMAGIC_RELAY, else the relay this kernel's "
        "tasks use, embedded on 127.0.0.1:$FEDMAGIC_PORT, 8765 by default, or a free "
        "port when that one is taken)",
    )
    @argument(
        "--split",
        default="iid",
        choices=("iid", "by-label"),
        help="how the digits are shared out (default iid)",
    )
    @argument(
        "--data-dir",
        help="where each participant's data goes, in its own directory "
        "(default <name>/data, name being the task's, where the examples read it)",
    )
    @line_magic
    def fedavg_local(self, line: str) -> LocalParticipants:
        """Start participant kernels on this machine, each with its own digits data."""
        args = parse_argstring(self.fedavg_local, line)
        if args.count < 1:
            raise UsageError("start at least one participant")
        session = self.session
        token = session.join_tokens.setdefault(args.task, new_token())
        group = LocalParticipants(
            args.task,
            args.count,
            args.relay or session.relay_url(),
            token,
            split=args.split,
            data_dir=args.data_dir,
            on_shutdown=session.release_relay,
        )
        session.add_local(group)
        return group

    @magic_arguments()
    @argument("url", help="the relay, e.g. ws://127.0.0.1:8765")
    @argument("--task", required=True, help="the task id")
    @argument("--token", default=None, help="the task's join token (default $FEDMAGIC_TOKEN)")
    @argument("--node", required=True, help="this node's name")
    @argument(
        "--data-root",
        help="run the task's code from this directory, where its "
        "relative data paths start (default: the notebook's)",
    )
    @argument(
        "--wait",
        type=float,
        default=300.0,
        help="seconds to wait for the task to appear (default 300)",
    )
    @line_magic
    def fedavg_join(self, line: str) -> ParticipantPanel:
        """Join a task from this notebook: review its code, verify your data, accept, train."""
        args = parse_argstring(self.fedavg_join, line)
        token = args.token or os.environ.get("FEDMAGIC_TOKEN")
        if not token:
            raise UsageError(
                "pass --token (or set FEDMAGIC_TOKEN): the task's author shares "
                "it with the join line"
            )
        if args.data_root:
            os.chdir(args.data_root)
        panel = ParticipantPanel(
            args.url, args.task, token, args.node, wait=args.wait, on_change=self.session.changed
        )
        self.session.joined[args.task] = panel
        self.session.changed()
        return panel

    @magic_arguments()
    @argument("participants", type=int, help="how many virtual participants")
    @argument(
        "--task",
        help="the task whose %%%%fedavg_task cell to run again (default: the last one run)",
    )
    @simulation_arguments
    @line_magic
    def fedavg_simulate(self, line: str) -> object:
        """Run a task's ``%%fedavg_task`` cell again, unchanged, with virtual participants
        sharing its training set instead of real ones; its widget follows the rounds."""
        args = parse_argstring(self.fedavg_simulate, line)
        cell = self.session.task_cells.get(args.task) if args.task else self.session.last_task_cell
        if cell is None:
            ran = ", ".join(map(repr, self.session.task_cells)) or "none yet"
            which = f"task {args.task!r}" if args.task else "a task"
            raise UsageError(
                f"no %%fedavg_task cell launched {which} in this kernel (launched: {ran}); "
                "run the task's cell first, then %fedavg_simulate tries it with virtual "
                "participants"
            )
        source, filename = cell
        options = {"simulate": {"participants": args.participants, **settings(args)}}
        with running_code(self.session.cell(source, filename, options=options)):
            return self._run(source, filename)

    def _run(self, cell: str, filename: str) -> object:
        """Run ``cell`` in the user's namespace; return its last expression's value."""
        shell = self._shell
        tree = ast.parse(shell.transform_cell(cell), filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        namespace = shell.user_ns
        exec(compile(tree, filename, "exec"), namespace)
        if last is None:
            return None
        return eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
