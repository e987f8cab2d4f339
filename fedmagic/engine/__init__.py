"""Running a task: the scheduler API, its package, the round loop, the participant's side.

Talks through :mod:`fedmagic.wire`; knows nothing of notebooks. Whoever runs a
task's code (a notebook cell, a participant) tells it what ``launch_task``
does there through :mod:`fedmagic.engine.context`.
"""
