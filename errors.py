"""Problems found in user input: each with a place, what is wrong, and how to fix it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a document, located as precisely as the format allows."""

    message: str
    path: str = ""  # field path such as "stages.train.network_dim"
    file: str = ""
    line: int | None = None
    fix: str = ""
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        where = self.file or "<pipeline>"
        if self.line:
            where += f":{self.line}"
        text = f"{where}: {self.severity}: "
        if self.path:
            text += f"{self.path}: "
        text += self.message
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text


@dataclass
class PipelineError(Exception):
    """Raised once at a boundary with every problem of a document, never one at a time."""

    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        errors = [p for p in self.problems if p.severity == "error"]
        head = f"{len(errors)} problem{'s' if len(errors) != 1 else ''} found"
        return head + "\n" + "\n".join(str(p) for p in self.problems)
