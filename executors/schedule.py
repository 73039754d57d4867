"""Which steps may run now: dependencies, a number of jobs, and a pool of GPUs each step takes
whole. Pure bookkeeping (no processes, no threads), so the local executor and any other can share it.

A step waits for every step it needs (`needs` and the steps its inputs come from) that is part of
this run; a step the run does not include (up to date, or not selected) counts as done. A step
whose dependency did not succeed is never started: `blocked` names why. Steps that write the same
output never run at the same time (a cache folder two stages fill is written by one at a time).
Among the steps that may start, the plan's order decides.

GPUs: a step takes `step_gpus(step)` devices from the pool and gives them back when it ends, so no
two running steps share a device. Without a pool (the configuration names no `gpus`) the
machine's GPUs are one unit: steps that use a GPU run one at a time, unpinned, as without --jobs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..compiler.plan import LAUNCH_ACCELERATE, LAUNCH_TOOL, Step, flag_value
from ..errors import PipelineError, Problem
from ..pipelines import registry



def step_gpus(step: Step) -> int:
    """GPUs the step occupies on this machine: accelerate's processes on it (num_processes over
    num_machines) for training, none for musubi-pipe's own tools, else the registry's count for
    the stage (scripts that never touch CUDA, such as LoRA conversion, say 0)."""
    if step.launcher == LAUNCH_TOOL:
        return 0
    if step.launcher == LAUNCH_ACCELERATE:
        flag = registry.launch_flags()
        try:
            processes = int(flag_value(step.launch_args, "--" + flag["processes"]) or 1)
            machines = int(flag_value(step.launch_args, "--" + flag["machines"]) or 1)
        except ValueError:
            return 1
        return max(1, processes // max(1, machines))
    return registry.stage_gpus(step.family, step.kind)


def gpu_pool(gpus: str) -> list[str]:
    """The configuration's `gpus` ("0,1,2,3") as a list of device ids; [] when it names none."""
    return [g.strip() for g in gpus.split(",") if g.strip()]


def check_gpus(steps: list[Step], pool: list[str], source: str = "", config_file: str = "") -> None:
    """Refuse, before anything runs, a step that needs more GPUs than the pool has."""
    problems = []
    for step in steps:
        need = step_gpus(step)
        if pool and need > len(pool):
            field_ = "num_processes" if step.launcher == LAUNCH_ACCELERATE else "kind"
            problems.append(Problem(
                f"stage {step.id!r} needs {need} GPUs and this machine's configuration lists {len(pool)} "
                f"(gpus = \"{','.join(pool)}\")", path=f"stages.{step.id}.{field_}", file=source,
                fix=f"set num_processes = {len(pool)} or fewer on the stage, or list more GPUs in `gpus` "
                    f"({config_file or 'the configuration'}) or MUSUBI_PIPE_GPUS"))
    if problems:
        raise PipelineError(problems)


@dataclass
class Scheduler:
    steps: list[Step]  # the steps of this run, in plan order
    jobs: int  # at most this many at once
    pool: list[str] = field(default_factory=list)  # device ids; [] = the GPUs are one unpinned unit
    waiting: list[str] = field(init=False)
    running: dict[str, list[str]] = field(init=False, default_factory=dict)  # id -> its devices
    ended: dict[str, str] = field(init=False, default_factory=dict)  # id -> succeeded/failed/cancelled/skipped

    def __post_init__(self):
        self.waiting = [s.id for s in self.steps]
        self._by_id = {s.id: s for s in self.steps}
        ids = set(self._by_id)
        self._deps = {s.id: [d for d in dict.fromkeys([*s.needs, *(i.from_step for i in s.inputs if i.from_step)])
                             if d in ids and d != s.id] for s in self.steps}
        self._free = list(self.pool)
        self._gpu_unit_busy = False

    def blocked(self) -> list[tuple[str, str]]:
        """Waiting steps that can never start (a dependency failed, was cancelled or skipped), with
        the reason; they are taken off the waiting list and count as skipped."""
        out = []
        changed = True
        while changed:
            changed = False
            for sid in list(self.waiting):
                bad = next((d for d in self._deps[sid] if self.ended.get(d, "succeeded") != "succeeded" and d in self.ended), None)
                if bad:
                    why = self.ended[bad] if self.ended[bad] != "skipped" else "not run"
                    out.append((sid, f"{bad} {why}"))
                    self.waiting.remove(sid)
                    self.ended[sid] = "skipped"
                    changed = True
        return out

    def startable(self) -> list[tuple[Step, list[str] | None]]:
        """Steps to start now, each with its devices (None: unpinned, the environment's GPUs);
        they count as running from here on."""
        out = []
        for sid in list(self.waiting):
            if len(self.running) >= self.jobs:
                break
            step = self._by_id[sid]
            if any(self.ended.get(d) != "succeeded" for d in self._deps[sid]):
                continue
            if self._writes_same(step):
                continue
            need = step_gpus(step)
            if self.pool:
                if need > len(self._free):
                    continue
                devices = self._free[:need]
                self._free = self._free[need:]
            elif need:
                if self._gpu_unit_busy:
                    continue
                self._gpu_unit_busy = True
                devices = None
            else:
                devices = []
            self.waiting.remove(sid)
            self.running[sid] = devices
            out.append((step, devices))
        return out

    def finish(self, sid: str, status: str) -> None:
        devices = self.running.pop(sid)
        if devices is None:
            self._gpu_unit_busy = False
        else:  # back in pool order, so assignments stay predictable
            self._free = [d for d in self.pool if d in self._free or d in devices]
        self.ended[sid] = status

    def drop_waiting(self) -> list[str]:
        """Take every waiting step off the list (a cancel): they count as skipped."""
        left, self.waiting = self.waiting, []
        for sid in left:
            self.ended[sid] = "skipped"
        return left

    def _writes_same(self, step: Step) -> bool:
        mine = {(o.path, o.pattern) for o in step.outputs if o.path}
        return any(mine & {(o.path, o.pattern) for o in self._by_id[r].outputs} for r in self.running)
