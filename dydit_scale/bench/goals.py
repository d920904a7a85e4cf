"""Benchmark goals: every goal a bench prints says whether this run met it, in the table and in --json
(`goal_checks`), so that a missed goal cannot pass for a number in a column."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

_COMPARE = {"<=": operator.le, ">=": operator.ge}


@dataclass(frozen=True)
class Goal:
    """`value op limit`; `shown` is the limit as the table prints it (e.g. "3 %" for 0.03)."""

    value: float
    op: Literal["<=", ">="]
    limit: float
    shown: str | None = None

    @property
    def met(self) -> bool:
        return bool(_COMPARE[self.op](self.value, self.limit))

    @property
    def text(self) -> str:
        return f"{self.op} {self.shown or f'{self.limit:g}'}"

    def mark(self) -> str:
        """"goal <= 1.10 met" or "goal <= 1.10 MISSED"."""
        return f"goal {self.text} {'met' if self.met else 'MISSED'}"

    def as_json(self) -> dict[str, float | str | bool]:
        return {"value": self.value, "goal": f"{self.op} {self.limit:g}", "met": self.met}


def goal_checks(goals: dict[str, Goal]) -> dict[str, dict[str, float | str | bool]]:
    """The `goal_checks` entry of a bench's JSON."""
    return {name: goal.as_json() for name, goal in goals.items()}
