"""The dry-run executor: the decisions a real run makes (the same plan checks, the same skips,
each step's reason), as the same events, and runs and writes nothing."""
from __future__ import annotations

from typing import Iterable

from ..compiler.plan import Plan
from . import events as ev
from .local import RunResult, check_plan, decide, select_steps
from .musubi_env import MusubiConfig
from .runlock import check_owner
from .state import StateFile, made_by_plan, state_path

DRY = "dry-run"


class DryExecutor:
    def __init__(self, config: MusubiConfig | None = None):
        self.config = config

    def cancel(self) -> None:  # nothing runs, so nothing to stop
        pass

    def run(self, plan: Plan, listeners: Iterable[ev.Listener] = (), force: bool = False,
            only: Iterable[str] | None = None, from_: str | None = None, until: str | None = None,
            retry=None) -> RunResult:
        listeners = list(listeners)

        def emit(e: ev.Event) -> None:
            for listener in listeners:
                listener(e)

        # What a real run refuses, a dry run refuses too: only this machine's own configuration
        # may allow what a plan asks for (code, uploads, folders), and a workdir has one owner.
        check_plan(plan, self.config or MusubiConfig())
        check_owner(plan)
        chosen = select_steps(plan, only, from_, until)
        to_run, stale, reasons = decide(plan, StateFile(state_path(plan)), chosen, force, made_by_plan(plan))
        if self.config is not None:  # a step the GPU pool cannot hold is refused as a real run refuses it
            from .schedule import check_gpus, gpu_pool

            check_gpus([s for s in plan.steps if s.id in to_run], gpu_pool(self.config.gpus), plan.source,
                       str(self.config.file or "") or "MUSUBI_PIPE_GPUS")
        emit(ev.Event(ev.PLAN, data={"steps": to_run, "skipped": [s.id for s in plan.steps if s.id not in to_run],
                                     "reasons": reasons, "run_dir": ""}))
        result = RunResult(DRY, None)
        for step in plan.steps:
            if step.id not in to_run:
                why = "up to date" if step.id not in stale else f"not selected ({reasons[step.id]})"
                result.steps[step.id] = "skipped"
                emit(ev.Event(ev.STEP_SKIPPED, step=step.id, data={"reason": why}))
                continue
            configured = self.config is not None and self.config.python and self.config.musubi_dir
            argv = step.command(str(self.config.python), str(self.config.musubi_dir)) if configured \
                else step.display_argv()
            emit(ev.Event(ev.STEP_START, step=step.id, data={"argv": argv, "log": "", "attempt": 1,
                                                             "changes": [], "kind": step.kind, "reason": reasons[step.id]}))
            emit(ev.Event(ev.STEP_END, step=step.id, data={"status": DRY, "returncode": None, "log": ""}))
            result.steps[step.id] = DRY
        emit(ev.Event(ev.RUN_END, data={"status": DRY, "run_dir": ""}))
        return result
