"""The local executor: runs a plan's steps as musubi-tuner subprocesses, streams their progress
as events, records each run in a folder, skips what is done, retries, cancels and resumes."""
from __future__ import annotations

import codecs
import json
import os
import re
import shlex
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from ..compiler.plan import LAUNCH_ACCELERATE, LAUNCH_TOOL, TOOL_COMMANDS, Plan, Step, flag_value
from ..errors import PipelineError, Problem
from . import events as ev
from ..files import write_atomic
from ..pipelines import registry
from .musubi_env import MusubiConfig, environment_facts
from .resume import (Resume, event_files, finish_leftovers, plan_resume, rename_resumed, resume_key,
                     shift_event_steps, snapshot_states, tag_new_states)
from .runlock import RunLock, check_owner, claim
from .runner import LocalRunner, Runner, StopReading
from .schedule import Scheduler, check_gpus, gpu_pool
from .state import (CANCELLED, FAILED, RUNNING, SUCCEEDED, StateFile, input_identities, made_by_plan,
                    missing_outputs, output_files, output_snapshot, sha256_file, stamp, state_path)

def launch_flags() -> set[str]:
    """`accelerate launch` flags a plan may carry (the registry's). Anything else (--module,
    --no_python, a config file) could change what runs, and that is the configuration's choice only."""
    from ..pipelines import registry

    return {"--" + option for role, option in registry.launch_flags().items() if role not in MACHINE_ROLES}


# accelerate launch roles only this machine's configuration fills (MusubiConfig.launch_args): its
# GPUs, its rank and the main process's address. A shared plan naming them is refused.
MACHINE_ROLES = ("gpu_ids", "machine_rank", "main_process_ip", "main_process_port")


# Environment a plan must not set: it would choose another program or inject code.
FORBIDDEN_ENV = re.compile(r"^(PATH|PYTHON(?!UNBUFFERED$|IOENCODING$).*|LD_.*|DYLD_.*|ACCELERATE_CONFIG_FILE|"
                           r"BASH_ENV|ENV|SHELL|HOME|COMSPEC|PATHEXT)$", re.IGNORECASE)
# Which GPUs a step sees is this machine's choice (its `gpus` pool), never a shared document's.
DEVICE_ENV = re.compile(r"^(CUDA|HIP|ROCR)_VISIBLE_DEVICES$", re.IGNORECASE)
SCRIPT_NAME = re.compile(r"^[A-Za-z0-9_]+(/[A-Za-z0-9_]+)*\.py$")
LOG_TAIL_BYTES = 64 * 1024


@dataclass
class RetryPolicy:
    """Opt-in retries: transient failures (hub download, lost connection) with backoff; an
    out-of-memory failure once, with the next memory-saving setting."""

    enabled: bool = False
    transient_tries: int = 2
    backoff_s: tuple[float, ...] = (10.0, 60.0)
    oom_retry: bool = True


@dataclass
class RunResult:
    status: str  # succeeded, failed, cancelled
    run_dir: Path | None
    steps: dict[str, str] = field(default_factory=dict)  # id -> succeeded/failed/cancelled/skipped


def check_plan(plan: Plan, config: MusubiConfig) -> None:
    """Refuse a plan that could run anything but musubi-tuner's own scripts, or write outside
    the configured output roots (when the configuration names any)."""
    problems = []
    allowed = launch_flags()
    for step in plan.steps:
        where = f"steps.{step.id}"
        if step.launcher == LAUNCH_TOOL:
            if tuple(step.args[:2]) not in TOOL_COMMANDS:
                problems.append(Problem(f"musubi-pipe command {' '.join(step.args[:2])!r} may not run from a plan", path=where + ".args",
                                        file=plan.source, fix=f"a plan may run: {', '.join(' '.join(c) for c in TOOL_COMMANDS)}"))
        elif not SCRIPT_NAME.match(step.script) or ".." in step.script:
            problems.append(Problem(f"script {step.script!r} is not a musubi-tuner script name", path=where + ".script",
                                    file=plan.source, fix="a plan may only name scripts inside src/musubi_tuner/"))
        for arg in step.launch_args:
            if arg.startswith("-") and arg.split("=", 1)[0] not in allowed:
                problems.append(Problem(f"accelerate launch flag {arg!r} is not allowed", path=where + ".launch_args",
                                        file=plan.source, fix=f"allowed: {', '.join(sorted(allowed))}"))
        for key in step.env:
            if FORBIDDEN_ENV.match(key):
                problems.append(Problem(f"environment variable {key} may not be set by a pipeline", path=where + ".env",
                                        file=plan.source, fix="set it in your own shell if you really need it"))
            elif DEVICE_ENV.match(key):
                problems.append(Problem(f"environment variable {key} may not be set by a pipeline: which GPUs a step uses "
                                        "is this machine's choice", path=where + ".env", file=plan.source,
                                        fix="remove it; set the GPUs in your configuration: musubi-pipe init --gpus 0,1 "
                                            "(or MUSUBI_PIPE_GPUS)"))
    for step in plan.steps:
        if step.launcher != LAUNCH_TOOL and SCRIPT_NAME.match(step.script):
            problems += _option_problems(plan, step, config)
        if step.launcher == LAUNCH_ACCELERATE:
            try:
                config.launch_args(step.launch_args)
            except PipelineError as err:
                problems += err.problems
    if config.allowed_output_roots:
        # Run records go to the workdir and the state file beside the pipeline: a shared document
        # (a ComfyUI workflow names its own base folder) must not put them elsewhere either.
        paths = [(plan.workdir, "workdir"), (str(state_path(plan)), "state file")]
        paths += [(f.path, "files") for f in plan.files]
        paths += [(o.path, f"steps.{s.id}.outputs.{o.name}") for s in plan.steps for o in s.outputs]
        for path, where in paths:
            if not config.is_allowed_output(path):
                problems.append(Problem(f"{path} is outside the allowed output folders", path=where, file=plan.source,
                                        fix=f"write under {', '.join(map(str, config.allowed_output_roots))} "
                                            f"or add a root to allowed_output_roots in {config.file}"))
    if problems:
        raise PipelineError(problems)


def _option_problems(plan: Plan, step: Step, config: MusubiConfig) -> list[Problem]:
    """Options in a step's argv that load code, send data away, or write outside the allowed
    roots, unless the local configuration allows them (a document never can)."""
    from ..compiler import contract
    from ..pipelines import registry

    try:
        parser = contract.parser(step.script)
    except contract.ContractError:
        return []  # not a recorded script (the compiler emits only those): no options to judge
    try:
        values = vars(parser.parse_args(step.args))
    except contract.ContractError as exc:
        return [Problem(f"musubi's {step.script} would reject this command: {exc}", path=f"steps.{step.id}.args", file=plan.source,
                        fix="compile the pipeline again with this musubi-pipe")]
    policy, where, out = registry.policy(), f"steps.{step.id}.args", []
    family = registry.family(step.family) if registry.canonical(step.family) else None
    known_modules = {family.network_module, *family.training["lycoris_modules"]} if family else set()
    cfg = str(config.file)

    def refuse(message: str, fix: str) -> None:
        out.append(Problem(message, path=where, file=plan.source, fix=fix))

    for option in policy["loads_code"]:
        if values.get(option) not in (None, False) and not config.allow_code:
            refuse(f"--{option} makes musubi load code or state from a file the pipeline names",
                   f"remove it from the pipeline; only your own config may allow it (allow_code = true in {cfg})")
    for option in policy["imports"]:
        value = values.get(option)
        if isinstance(value, str) and "." in value and value not in known_modules and value not in config.allowed_imports \
                and not config.allow_code:
            refuse(f"--{option} {value} makes musubi import {value}",
                   f"use a name musubi knows, or add {value!r} to allowed_imports in {cfg}")
    remote = values.get("log_with") in policy["remote_trackers"]
    for option in policy["sends_data"] + (["log_with"] if remote else []):
        if values.get(option) not in (None, False) and not config.allow_upload:
            refuse(f"--{option} sends data to another machine", f"remove it from the pipeline; only your own config may allow uploads "
                                                                 f"(allow_upload = true in {cfg})")
    if config.allowed_output_roots:
        for option in policy["writes"]:
            value = values.get(option)
            if isinstance(value, str) and value and not config.is_allowed_output(value):
                refuse(f"--{option} {value} writes outside the allowed output folders",
                       f"write under {', '.join(map(str, config.allowed_output_roots))}")
    return out


def redact(words: list[str]) -> list[str]:
    """An argv with the values of secret options replaced, for run records."""
    from ..pipelines import registry

    secrets = {"--" + s for s in registry.policy()["secrets"]}
    out, hide = [], False
    for word in words:
        flag, eq, _ = word.partition("=")
        out.append("***" if hide else f"{flag}=***" if eq and flag in secrets else word)
        hide = word in secrets
    return out


# What a run summary names: the artifacts people look for, not checkpoints, states or caches.
RESULT_OUTPUTS = ("lora", "model", "videos", "images")


def final_files(plan: Plan, state: StateFile) -> dict[str, list[str]]:
    """Step -> the result files its last successful run made (up-to-date steps too)."""
    found = {}
    for step in plan.steps:
        record = state.record(step.id) or {}
        if record.get("status") != SUCCEEDED:
            continue
        paths = [o["path"] for o in record.get("outputs", []) if o.get("output") in RESULT_OUTPUTS]
        if paths:
            found[step.id] = paths
    return found


def redacted(plan: Plan) -> Plan:
    """The plan as run records keep it: secret option values replaced."""
    steps = [replace(s, args=redact(s.args), fallbacks=[replace(f, args=redact(f.args)) for f in s.fallbacks]) for s in plan.steps]
    return replace(plan, steps=steps)


def select_steps(plan: Plan, only: Iterable[str] | None, from_: str | None, until: str | None) -> list[str]:
    """Step ids chosen by --only / --from / --until, in plan order (from/until are inclusive)."""
    ids = [s.id for s in plan.steps]
    named = list(only or []) + [n for n in (from_, until) if n]
    unknown = [n for n in named if n not in ids]
    if unknown:
        raise PipelineError([Problem(f"no step named {n!r}", path="--only/--from/--until",
                                     fix=f"steps are: {', '.join(ids)}") for n in unknown])
    chosen = ids
    if from_:
        chosen = chosen[ids.index(from_):]
    if until:
        chosen = [i for i in chosen if ids.index(i) <= ids.index(until)]
    if only:
        chosen = [i for i in chosen if i in set(only)]
    return chosen


def decide(plan: Plan, state: StateFile, chosen: list[str], force: bool,
           exclude: list[str]) -> tuple[list[str], set[str], dict[str, str]]:
    """Which steps run (selected and forced or stale), which are stale, and why, in plan order."""
    stale: set[str] = set()
    reasons: dict[str, str] = {}
    for step in plan.steps:
        why = state.why_stale(step, exclude, stale)
        if step.id in chosen and force:
            why = why or "forced"
        if why:
            stale.add(step.id)
            reasons[step.id] = why
    return [s.id for s in plan.steps if s.id in chosen and s.id in stale], stale, reasons


# argv edits (set_flag, remove_flag) and resuming live in resume.py; flag_value in compiler/plan.py


# ---------------------------------------------------------------------------------- the run


def end_running_records(plan: Plan, cause: str) -> None:
    """Mark steps the state file still calls running as failed (and `interrupted`), with `cause`:
    called holding the lock, when no process of this pipeline can be running them."""
    try:
        state = StateFile(state_path(plan))
        running = [r for r in state.steps.values() if isinstance(r, dict) and r.get("status") == RUNNING]
        for record in running:
            record.update(status=FAILED, interrupted=True, cause=cause, finished=record.get("finished") or time.time(),
                          fix="run again: finished steps are skipped, and training resumes from its newest saved state")
        if running:
            state.save()
    except OSError:  # on the way out of a failing run: the original error matters more
        pass


class LocalExecutor:
    """Runs plans on this machine. `cancel()` may be called from any thread or signal handler."""

    def __init__(self, config: MusubiConfig, grace_s: float | None = None, sleep: Callable[[float], None] | None = None,
                 runner: Runner | None = None):
        self.config = config
        self.grace_s = config.cancel_grace_s if grace_s is None else grace_s
        self.runner = runner or LocalRunner(self.grace_s)  # where step processes run (executors/runner.py)
        self._cancel = threading.Event()
        self._emit_lock = threading.Lock()
        self._events_file = None
        self._listeners: list = []
        self._sleep = sleep

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- events
    def _emit(self, event: ev.Event) -> None:
        with self._emit_lock:
            if self._events_file is not None:
                self._events_file.write(json.dumps(event.to_dict(), ensure_ascii=False, default=str) + "\n")
                self._events_file.flush()
            for listener in self._listeners:
                try:
                    listener(event)
                except Exception as exc:  # a broken front end must not break the run
                    try:
                        print(f"musubi-pipe: listener error: {exc!r}", file=sys.stderr)
                    except (OSError, ValueError):  # nor a closed stderr
                        pass

    def run(self, plan: Plan, listeners: Iterable[ev.Listener] = (), force: bool = False,
            only: Iterable[str] | None = None, from_: str | None = None, until: str | None = None,
            retry: RetryPolicy | None = None, jobs: int | None = None) -> RunResult:
        """Run the plan, holding its workdir's lock: one run of a pipeline at a time.

        `jobs`: run up to this many steps at once (`run --jobs N`), each whose dependencies
        succeeded, pinned to its own GPUs from the configuration's `gpus` pool (executors/
        schedule.py). A failed step skips its dependents; independent branches go on (a sweep
        left overnight finishes every branch it can). None: one step at a time in plan order, and
        the first step that does not succeed ends the run."""
        self.config.require()
        check_plan(plan, self.config)
        check_owner(plan)
        with RunLock(plan):
            claim(plan)
            # holding the lock, a step still "running" belongs to a run that died (kill -9, power)
            end_running_records(plan, "the run that ran this step ended without recording how (killed, or the machine stopped)")
            try:
                return self._run(plan, listeners, force, only, from_, until, retry, jobs)
            except BaseException as exc:  # a crash or an interrupt: the step was stopped, say so in the state
                end_running_records(plan, f"musubi-pipe stopped while this step ran: {type(exc).__name__}: {exc}")
                raise

    def _run(self, plan: Plan, listeners: Iterable[ev.Listener], force: bool, only: Iterable[str] | None,
             from_: str | None, until: str | None, retry: RetryPolicy | None, jobs: int | None = None) -> RunResult:
        if jobs is not None and jobs < 1:
            raise PipelineError([Problem(f"--jobs {jobs}: expected 1 or more", path="--jobs", fix="--jobs 4")])
        chosen = select_steps(plan, only, from_, until)
        self._cancel.clear()
        self._listeners = list(listeners)
        self._retry = retry or RetryPolicy()
        self.state = StateFile(state_path(plan))
        self._write_generated(plan)
        exclude = made_by_plan(plan)

        to_run, stale, reasons = decide(plan, self.state, chosen, force, exclude)
        check_gpus([s for s in plan.steps if s.id in to_run], gpu_pool(self.config.gpus), plan.source,
                   str(self.config.file or "") or "MUSUBI_PIPE_GPUS")
        result = RunResult(SUCCEEDED, None)
        self.run_dir = None
        try:
            if to_run:
                self._open_run_dir(plan)
            self._emit(ev.Event(ev.PLAN, data={"steps": to_run, "skipped": [s.id for s in plan.steps if s.id not in to_run],
                                               "reasons": reasons, "run_dir": str(self.run_dir or "")}))
            if jobs is None:
                self._run_in_order(plan, to_run, stale, reasons, exclude, result)
            else:
                self._run_parallel(plan, to_run, stale, reasons, exclude, result, jobs)
            result.run_dir = self.run_dir
            end = {"status": result.status, "run_dir": str(self.run_dir or ""), "files": final_files(plan, self.state)}
            if plan.sweeps and self.run_dir is not None:
                end["comparison"] = self._compare(plan)
            self._emit(ev.Event(ev.RUN_END, data=end))
        finally:
            if self._events_file is not None:
                self._events_file.close()
                self._events_file = None
        return result

    def _run_in_order(self, plan: Plan, to_run: list[str], stale: set[str], reasons: dict[str, str],
                      exclude: list[str], result: RunResult) -> None:
        stopped = ""
        for step in plan.steps:
            if step.id in to_run and not stopped and self._cancel.is_set():
                result.status, stopped = CANCELLED, "the run was cancelled"
            if step.id not in to_run or stopped:
                why = f"not run: {stopped}" if step.id in to_run else (
                    "up to date" if step.id not in stale else f"not selected ({reasons[step.id]})")
                result.steps[step.id] = "skipped"
                self._emit(ev.Event(ev.STEP_SKIPPED, step=step.id, data={"reason": why}))
                continue
            status = self._run_step(step, exclude)
            result.steps[step.id] = status
            if status != SUCCEEDED:
                result.status = status
                stopped = f"{step.id} {status}"

    def _run_parallel(self, plan: Plan, to_run: list[str], stale: set[str], reasons: dict[str, str],
                      exclude: list[str], result: RunResult, jobs: int) -> None:
        """Steps in threads, as the scheduler allows; this thread only starts and collects them."""
        import queue

        for step in plan.steps:
            if step.id not in to_run:
                result.steps[step.id] = "skipped"
                why = "up to date" if step.id not in stale else f"not selected ({reasons[step.id]})"
                self._emit(ev.Event(ev.STEP_SKIPPED, step=step.id, data={"reason": why}))
        sched = Scheduler([s for s in plan.steps if s.id in to_run], jobs, gpu_pool(self.config.gpus))
        done: queue.Queue = queue.Queue()
        crashed: list[BaseException] = []

        def work(step: Step, devices: list[str] | None) -> None:
            try:
                status = self._run_step(step, exclude, devices)
            except BaseException as exc:  # musubi-pipe's own error: stop the others, re-raise below
                crashed.append(exc)
                self._cancel.set()
                status = FAILED
                self._emit(ev.Event(ev.STEP_END, step=step.id, data={
                    "status": FAILED, "cause": f"musubi-pipe error: {type(exc).__name__}: {exc}", "fix": "report it"}))
            done.put((step.id, status))

        def skip(sid: str, why: str) -> None:
            result.steps[sid] = "skipped"
            self._emit(ev.Event(ev.STEP_SKIPPED, step=sid, data={"reason": f"not run: {why}"}))

        threads = []
        while sched.waiting or sched.running:
            try:
                if self._cancel.is_set():
                    for sid in sched.drop_waiting():
                        skip(sid, "the run was cancelled")
                for sid, why in sched.blocked():
                    skip(sid, why)
                for step, devices in sched.startable():
                    t = threading.Thread(target=work, args=(step, devices), name=f"step-{step.id}", daemon=True)
                    threads.append(t)
                    t.start()
                if not sched.running:
                    if sched.waiting:  # nothing runs and nothing can start: the plan's needs form a loop
                        raise PipelineError([Problem(f"steps {', '.join(sched.waiting)} wait on each other", path="needs",
                                                     file=plan.source, fix="compile the pipeline again with this musubi-pipe")])
                    continue
                try:
                    sid, status = done.get(timeout=0.5)
                except queue.Empty:
                    continue
                sched.finish(sid, status)
                result.steps[sid] = status
            except KeyboardInterrupt:  # no signal handler installed by the caller: same as cancel()
                self._cancel.set()
        for t in threads:
            t.join()
        if crashed:
            raise crashed[0]
        ended = set(result.steps.values())
        result.status = CANCELLED if CANCELLED in ended or self._cancel.is_set() else FAILED if FAILED in ended else SUCCEEDED

    def _compare(self, plan: Plan) -> str:
        """The sweep's comparison in the run folder (sweep.txt, .json, .png); its path, or "" when
        it could not be made: the steps' results stand either way."""
        from .sweep_report import compare

        try:
            compare(plan, self.run_dir)
        except Exception as exc:  # noqa: BLE001 - a report must not turn a finished run into a crash
            print(f"musubi-pipe: could not compare the sweep's branches: {exc!r}", file=sys.stderr)
            return ""
        return str(self.run_dir / "sweep.txt")

    def _write_generated(self, plan: Plan) -> None:
        """Write the plan's generated files atomically. An existing file with other content is
        replaced only if musubi-pipe wrote it (its hash is in the state file): never a user's file."""
        changed = False
        for gen in plan.files:
            path = Path(gen.path)
            data = gen.content.encode("utf-8")
            import hashlib

            new_hash = hashlib.sha256(data).hexdigest()
            if path.exists():
                current = sha256_file(path)
                if current == new_hash:
                    self.state.generated[str(path)] = new_hash
                    continue
                if self.state.generated.get(str(path)) != current:
                    raise PipelineError([Problem(
                        f"{path} exists and was not written by musubi-pipe (or was edited since)",
                        file=plan.source, path="files",
                        fix="move or delete it, or rename the generated file in the pipeline")])
            write_atomic(path, data)
            self.state.generated[str(path)] = new_hash
            changed = True
        if changed:
            self.state.save()

    def _open_run_dir(self, plan: Plan) -> None:
        base = Path(plan.workdir) / "runs"
        stamp_ = time.strftime("%Y%m%d-%H%M%S")
        base.mkdir(parents=True, exist_ok=True)
        run_dir, n = base / stamp_, 1
        while True:  # mkdir, not exists(): two runs starting in the same second get different folders
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                n += 1
                run_dir = base / f"{stamp_}-{n}"
        self.run_dir = run_dir
        write_atomic(run_dir / "plan.json", redacted(plan).to_json())
        write_atomic(run_dir / "environment.json",
                          json.dumps(environment_facts(self.config), indent=2, ensure_ascii=False, default=str))
        (run_dir / "commands.txt").write_text("", encoding="utf-8")
        self._events_file = open(run_dir / "events.jsonl", "a", encoding="utf-8")

    def _note_command(self, step: Step, argv: list[str], env: dict, note: str) -> None:
        with self._emit_lock, open(self.run_dir / "commands.txt", "a", encoding="utf-8") as f:
            f.write(f"# {step.id}" + (f" ({note})" if note else "") + "\n")
            prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
            f.write((prefix + " " if prefix else "") + shlex.join(redact(argv)) + "\n\n")

    def _run_step(self, step: Step, exclude: list[str], devices: list[str] | None = None) -> str:
        log_path = self.run_dir / f"{step.id}.log"
        previous = self.state.record(step.id)
        changes = finish_leftovers(previous)  # what an earlier run that died could not finish
        # The memory setting that worked last time, if the plan still offers it: out of memory
        # again first would only cost time.
        level = _worked_before(step, previous)
        if level:
            changes.append(f"starting with {step.fallbacks[level - 1].why} (it worked last run; out of memory without it)")
        record = {
            "status": RUNNING, "fingerprint": step.fingerprint, "args": redact(step.args), "started": time.time(),
            "run": str(self.run_dir),
            "log": str(log_path), "inputs": input_identities(step, exclude),
            "needs": {n: stamp(self.state.record(n)) for n in step.needs},
        }
        if level:
            record["memory"] = asdict(step.fallbacks[level - 1])
        record["key"] = resume_key(record)
        base = step.fallbacks[level - 1].args if level else list(step.args)
        resume, not_resumed = plan_resume(replace(step, args=base), record, previous)
        args = list(base)
        if resume:
            args = resume.args
            changes.append(resume.note)
            record["attempt"] = resume.to_record()  # a run that dies mid-attempt leaves these to rename
        elif not_resumed:
            changes.append(not_resumed)
        # what a later resume needs from earlier attempts with the same settings and inputs
        same = previous if previous and previous.get("key") == record["key"] else {}
        record["progress"] = same.get("progress", {})
        record["resumes"] = same.get("resumes", 0) + (1 if resume else 0)
        states = _state_folders(step)
        if states:  # state folders that appear from now on were saved under this record's key
            record.update(step=step.id, states_where=[str(states[0]), states[1]], states_before=snapshot_states(*states))
        self.state.put(step.id, record)
        before = output_snapshot(step)  # a file already there is not what this step wrote
        logs = flag_value(args, registry.option("logging_dir"))
        logs = Path(step.cwd or Path(self.run_dir).parent.parent, logs) if logs and resume else None
        logs_seen = event_files(logs)  # a resumed attempt's TensorBoard steps are shifted once
        for out in step.outputs:  # musubi's savers do not create missing folders
            folder = Path(out.path) if out.pattern else Path(out.path).parent
            if out.path:
                folder.mkdir(parents=True, exist_ok=True)
        transient_left = self._retry.transient_tries if self._retry.enabled else 0
        oom_retry = self._retry.enabled and self._retry.oom_retry
        attempt = 0
        while True:
            attempt += 1
            status, rc = self._attempt(step, args, log_path, attempt, changes, record, devices)
            if resume:
                spe = (step.meta or {}).get("steps_per_epoch") or record["progress"].get("steps_per_epoch")
                changes.extend(f"renamed {r}" for r in rename_resumed(resume, spe))
                for f in sorted(event_files(logs) - logs_seen):
                    shift_event_steps(f, resume)
                    logs_seen.add(f)
            if states:
                tag_new_states(*states, record["states_before"], record["key"], step.id)
            missing = missing_outputs(step, before) if status == SUCCEEDED else []
            if status == SUCCEEDED and not missing:
                record["outputs"] = output_files(step)
                for o in record["outputs"]:
                    self._emit(ev.Event(ev.OUTPUT, step=step.id, data={"name": o["output"], "path": o["path"]}))
                if (step.meta or {}).get("batch_prompts"):
                    record["prompt_outputs"] = self._match_batch(step, record["started"])
                return self._end_step(step, record, SUCCEEDED, rc, log_path, changes)
            if status == CANCELLED:
                return self._end_cancelled(step, record, rc, log_path, changes)
            from .failures import classify

            # the advice names the plan's next memory setting after the one this attempt used
            following = step.fallbacks[level] if level < len(step.fallbacks) else None
            failure = classify(_tail(log_path), rc, step.kind, {**(step.meta or {}), "family": step.family,
                                                                "next_memory": following.why if following else None})
            cause, fix = failure.cause, failure.fix
            if missing:
                cause = f"exited 0 but did not write {missing[0]}" + (f" ({failure.cause})" if failure.cause else "")
                fix = failure.fix or "read the log; musubi reported success without saving the promised file"
            retry_note, delay = None, 0.0
            if failure.transient and transient_left > 0:
                transient_left -= 1
                delays = self._retry.backoff_s or (0,)
                delay = delays[min(len(delays) - 1, self._retry.transient_tries - transient_left - 1)]
                retry_note = f"attempt {attempt} failed ({cause}); retrying in {delay:.0f} s"
            elif failure.category == "oom" and oom_retry and following:
                level += 1
                args = following.args
                if resume:  # resume from the same state, with the new setting
                    again, _ = plan_resume(replace(step, args=args), record, previous)
                    args = again.args if again else args
                record["memory"] = asdict(following)
                retry_note = f"out of memory; retrying with {following.why}"
            if retry_note is None:
                return self._end_step(step, record, FAILED, rc, log_path, changes, cause=cause, fix=fix,
                                      category=failure.category)
            changes.append(retry_note)
            self._emit(ev.Event(ev.LOG, step=step.id, data={"stream": "musubi-pipe", "text": retry_note}))
            if delay:
                (self._sleep or self._cancel.wait)(delay)  # a cancel during the wait ends it early
            if self._cancel.is_set():
                return self._end_cancelled(step, record, rc, log_path, changes)

    def _end_step(self, step: Step, record: dict, status: str, rc: int, log_path: Path, changes: list[str],
                  **why: str) -> str:
        """Save how the step ended, then say so: the STEP_END event carries what the record keeps."""
        record.update(status=status, finished=time.time(), returncode=rc, changes=changes, **why)
        self.state.put(step.id, record)
        self._emit(ev.Event(ev.STEP_END, step=step.id, data={
            "status": status, "returncode": rc, "log": str(log_path), "changes": changes, **why}))
        return status

    def _end_cancelled(self, step: Step, record: dict, rc: int, log_path: Path, changes: list[str]) -> str:
        resumes = ", training resumes from its newest saved state" if (step.meta or {}).get("save_state") else ""
        return self._end_step(step, record, CANCELLED, rc, log_path, changes, cause="cancelled by the user",
                              fix="run again: finished steps are skipped" + resumes)

    def _attempt(self, step: Step, args: list[str], log_path: Path, attempt: int, changes: list[str],
                 record: dict, devices: list[str] | None = None) -> tuple[str, int]:
        """One command through the runner: start, pump output into log/parser/listeners, wait or cancel.
        `devices`: the GPUs the parallel scheduler pinned the step to; None: the configuration's."""
        from .progress import ProgressParser

        launch = self.config.launch_args(step.launch_args, devices)
        run_step = replace(step, args=args, launch_args=[*step.launch_args, *launch])
        argv = run_step.command(str(self.config.python), str(self.config.musubi_dir))
        # a pinned step's devices win over anything else (two steps must never share a GPU)
        shown = {**self.config.step_env(), **step.env} if devices is None else {**step.env, **self.config.step_env(devices)}
        env = step_environment({**shown, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"})
        cwd = step.cwd or str(Path(self.run_dir).parent.parent)
        if devices is None:  # the runner learns what the environment holds (see executors/runner.py)
            devices = gpu_pool(env.get("CUDA_VISIBLE_DEVICES", "")) if self.config.gpus else []
        self._note_command(step, argv, shown, "; ".join(changes) if changes else "")
        parser = ProgressParser(step.id, step.kind)
        with open(log_path, "ab") as log:
            header = f"=== musubi-pipe: {step.id} attempt {attempt}: {shlex.join(argv)}\n"
            if changes:
                header += "=== changes: " + "; ".join(changes) + "\n"
            log.write(header.encode("utf-8"))
            log.flush()
            self._emit(ev.Event(ev.STEP_START, step=step.id, data={
                "argv": redact(argv), "log": str(log_path), "attempt": attempt, "changes": list(changes), "kind": step.kind,
                "devices": list(devices),
                "output_dir": (step.meta or {}).get("output_dir", "")}))
            try:
                proc = self.runner.start(argv, cwd, env, devices)
            except OSError as exc:
                log.write(f"cannot start: {exc}\n".encode())
                return FAILED, 127
            log_lock, parse_lock = threading.Lock(), threading.Lock()
            decoders = {n: codecs.getincrementaldecoder("utf-8")("replace") for n in ("stdout", "stderr")}

            def deliver(parse: Callable[[], list[ev.Event]]) -> None:
                # both streams feed one parser (its phase is shared): emit under the same lock, so
                # events leave in the order they were read
                with parse_lock:
                    for e in parse():
                        self._note_progress(record, e)
                        self._emit(e)

            def on_chunk(name: str, chunk: bytes) -> None:
                with log_lock:
                    try:
                        log.write(chunk)
                        log.flush()
                    except ValueError:  # closed: musubi-pipe is failing and left the step
                        raise StopReading()
                text = decoders[name].decode(chunk)
                if text:
                    deliver(lambda: parser.feed(name, text))

            reader = threading.Thread(target=proc.stream, args=(on_chunk,), daemon=True)
            reader.start()
            cancelled = ended = False
            try:
                try:
                    while True:
                        rc = proc.wait(0.05)
                        if rc is not None:
                            break
                        if self._cancel.is_set():
                            cancelled = True
                            rc = proc.stop(self.grace_s)
                            break
                except KeyboardInterrupt:  # no signal handler installed by the caller: same as cancel()
                    self._cancel.set()
                    cancelled = True
                    rc = proc.stop(self.grace_s)
                ended = True
            finally:
                if not ended:  # musubi-pipe itself is failing: the step must not outlive the error
                    try:
                        proc.stop(self.grace_s)
                        ended = True
                    except BaseException:  # a second interrupt: close(done=False) ends what is left
                        pass
                proc.close(done=ended)
            reader.join(timeout=5)
            for name, decoder in decoders.items():
                rest = decoder.decode(b"", final=True)
                if rest:
                    deliver(lambda: parser.feed(name, rest))
            deliver(parser.flush)  # an unterminated last line is still a line
            log.write(f"\n=== musubi-pipe: exit code {rc}{' (cancelled)' if cancelled else ''}\n".encode())
        if cancelled:
            return CANCELLED, rc
        return (SUCCEEDED if rc == 0 else FAILED), rc

    def _match_batch(self, step: Step, started: float) -> str:
        """Pair a batch's prompts with the files musubi named by time and seed; the pairs go to
        the run folder and out as OUTPUT events with the prompt's index."""
        from ..tools.prompts import match_outputs

        pairs = match_outputs(step.meta["batch_prompts"], step.meta["save_path"], since=started)
        table = [{"index": p.index, "prompt": p.prompt.text, "seed": p.prompt.seed, "output": p.output} for p in pairs]
        path = self.run_dir / f"{step.id}-prompts.json"
        write_atomic(path, json.dumps(table, indent=1, ensure_ascii=False) + "\n")
        for row in table:
            self._emit(ev.Event(ev.OUTPUT, step=step.id, data={"name": "prompt_output", "path": row["output"] or "",
                                                              "prompt": row["index"], "text": row["prompt"]}))
        return str(path)

    def _note_progress(self, record: dict, e: ev.Event) -> None:
        """Keep the training length musubi printed: a later resume computes what is left from it."""
        if record.get("attempt"):
            _whole_run_progress(Resume.from_record(record["attempt"]), e, record.get("progress", {}))
        known = (record.get("progress") or {}).get("steps_per_epoch")
        if e.kind == ev.PROGRESS and e.phase == "training" and e.total:
            prog = record.setdefault("progress", {})
            prog["total"] = e.total
            if e.epochs:
                prog["epochs"] = e.epochs
                prog["steps_per_epoch"] = e.total // e.epochs if e.total % e.epochs == 0 else prog.get("steps_per_epoch")
        steps_per_epoch = (e.data or {}).get("steps_per_epoch")
        if steps_per_epoch:
            record.setdefault("progress", {})["steps_per_epoch"] = steps_per_epoch
        if e.step and not known and (record.get("progress") or {}).get("steps_per_epoch"):
            self.state.put(e.step, record)  # on disk now: a run killed later (kill -9) can still be resumed


def _state_folders(step: Step) -> tuple[Path, str] | None:
    """Where a training step that saves state puts its `-state` folders, and under which name."""
    meta = step.meta or {}
    if step.kind not in registry.TRAINING_KINDS or not meta.get("save_state") or not meta.get("output_dir") or not meta.get("output_name"):
        return None
    return Path(meta["output_dir"]), meta["output_name"]


def _whole_run_progress(res: Resume, e: ev.Event, progress: dict) -> None:
    """A resumed attempt counts its steps and epochs from 0: show them as the whole run's."""
    if e.kind != ev.PROGRESS or e.phase not in ("training", "saving", "done"):
        return
    if e.current is not None and res.done_steps is not None:
        e.current += res.done_steps
    if e.total is not None and res.total_steps:
        e.total = res.total_steps
    if e.epoch is not None and res.done_epochs is not None:
        e.epoch += res.done_epochs
    spe = progress.get("steps_per_epoch") or (e.data or {}).get("steps_per_epoch")
    whole_epochs = res.total_epochs or (-(-res.total_steps // spe) if res.total_steps and spe else None)
    if e.epochs is not None and whole_epochs:
        e.epochs = whole_epochs
def step_environment(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment plus `extra`, less the PYTHONPATH entries that are relative or
    empty: they name the step's working directory, a folder a shared document chooses."""
    env = {**os.environ, **extra}
    if "PYTHONPATH" in env:
        kept = [p for p in env["PYTHONPATH"].split(os.pathsep) if p and os.path.isabs(p)]
        env["PYTHONPATH"] = os.pathsep.join(kept)
        if not kept:
            del env["PYTHONPATH"]
    return env


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
        return f.read().decode("utf-8", "replace")


def _worked_before(step: Step, previous: dict | None) -> int:
    """The level of the step's memory ladder (1-based; 0 = the plan's own settings) that the last
    run of this step ended with, when the plan still offers those settings."""
    memory = (previous or {}).get("memory")
    if not memory or (previous or {}).get("category") == "oom":
        return 0
    for level, fallback in enumerate(step.fallbacks, 1):
        if fallback.settings == memory.get("settings"):
            return level
    return 0
