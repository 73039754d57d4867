"""Events: what every executor emits and every front end (terminal, ComfyUI, JSON log) listens to."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

# Event kinds
PLAN = "plan"  # a run starts: data = {"steps": [...ids...], "skipped": [...]}
STEP_START = "step_start"  # data = {"argv": [...], "log": path, "kind": ..., "output_dir": training's output folder or ""}
STEP_SKIPPED = "step_skipped"  # data = {"reason": "..."}
PROGRESS = "progress"  # phase/current/total/epoch/loss/it_s/eta_s
LOG = "log"  # one line of the child's output: data = {"stream": "stdout"|"stderr", "text": ...}
OUTPUT = "output"  # a file a step made: data = {"name": ..., "path": ...}
STEP_END = "step_end"  # data = {"status": "succeeded"|"failed"|"cancelled", "returncode": int,
#                         "cause": one line, "fix": one line, "log": path}
RUN_END = "run_end"  # data = {"status": ...}

# Phases a progress event can report
PHASES = ("starting", "loading", "caching", "training", "sampling", "saving", "generating", "converting", "done")


@dataclass
class Event:
    kind: str
    step: str = ""
    time: float = field(default_factory=time.time)
    phase: str = ""
    current: int | None = None
    total: int | None = None
    epoch: int | None = None
    epochs: int | None = None
    loss: float | None = None
    rate: float | None = None  # iterations per second
    eta_s: float | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, "")}


Listener = Callable[[Event], None]
