"""Generated evaluation tasks for `pymoi eval`: problems, answer verifiers and statistics."""

from . import arithmetic, countdown
from .problems import Task

TASKS: dict[str, Task] = {task.name: task for task in (countdown.TASK, arithmetic.TASK)}
