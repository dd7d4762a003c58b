"""Evaluation tasks for `pymoi eval`: generated ones and problem files, answer verifiers and statistics."""

from . import arithmetic, countdown
from .problems import Problem, Task

TASKS: dict[str, Task[Problem]] = {task.name: task for task in (countdown.TASK, arithmetic.TASK)}
