"""The local executor: runs a plan's steps as musubi-tuner subprocesses, streams their progress
as events, records each run in a folder, skips what is done, retries, cancels and resumes."""
from __future__ import annotations

import codecs
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from ..compiler.plan import LAUNCH_TOOL, TOOL_COMMANDS, Plan, Step
from ..errors import PipelineError, Problem
from . import events as ev
from ..files import write_atomic
from .musubi_env import MusubiConfig, environment_facts
from .runlock import RunLock, check_owner, claim
from .watchdog import Watchdog
from .state import (CANCELLED, FAILED, RUNNING, SUCCEEDED, StateFile, input_identities, made_by_plan,
                    missing_outputs, output_files, sha256_file, stamp, state_path)

# `accelerate launch` flags a plan may carry. Anything else (--module, --no_python, a config
# file) could change what runs, and the program that runs is the configuration's choice only.
LAUNCH_FLAGS = {"--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
                "--main_process_port", "--mixed_precision", "--num_cpu_threads_per_process",
                "--multi_gpu", "--gpu_ids", "--dynamo_backend", "--same_network", "--quiet"}
# Environment a plan must not set: it would choose another program or inject code.
FORBIDDEN_ENV = re.compile(r"^(PATH|PYTHON(?!UNBUFFERED$|IOENCODING$).*|LD_.*|DYLD_.*|ACCELERATE_CONFIG_FILE|"
                           r"BASH_ENV|ENV|SHELL|HOME|COMSPEC|PATHEXT)$", re.IGNORECASE)
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
            if arg.startswith("-") and arg.split("=", 1)[0] not in LAUNCH_FLAGS:
                problems.append(Problem(f"accelerate launch flag {arg!r} is not allowed", path=where + ".launch_args",
                                        file=plan.source, fix=f"allowed: {', '.join(sorted(LAUNCH_FLAGS))}"))
        for key in step.env:
            if FORBIDDEN_ENV.match(key):
                problems.append(Problem(f"environment variable {key} may not be set by a pipeline", path=where + ".env",
                                        file=plan.source, fix="set it in your own shell if you really need it"))
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


# ------------------------------------------------------------------------------- argv edits


def flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def set_flag(args: list[str], flag: str, value: str | None = None) -> list[str]:
    """A copy of args with `flag` (and its value, if given) set, replacing an existing value."""
    out = remove_flag(args, flag, takes_value=value is not None)
    return out + ([flag, value] if value is not None else [flag])


def remove_flag(args: list[str], flag: str, takes_value: bool = True) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = takes_value
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out


# ----------------------------------------------------------------------------------- resume

STATE_DIR = re.compile(r"^(?P<name>.+?)-(?:step(?P<step>\d{8})|(?P<epoch>\d{6}))-state$")


@dataclass
class Resume:
    state_dir: str
    done_steps: int | None  # global optimisation steps already done
    done_epochs: int | None
    args: list[str]
    attempt_name: str  # the --output_name this attempt writes under, renamed afterwards
    note: str
    out_dir: Path  # where the step writes, and the --output_name its files are renamed to
    name: str


def plan_resume(step: Step, record: dict | None) -> Resume | None:
    """For an interrupted training step that saves state: resume from the newest state folder.

    musubi restarts its step counter at 0 on --resume, so the attempt trains only the steps
    that are left, under a temporary --output_name (`<name>-resume<k>`) so it cannot overwrite
    the checkpoints already saved; afterwards its files are renamed to the global numbering."""
    meta = step.meta or {}
    if step.kind != "train" or not meta.get("save_state") or flag_value(step.args, "--resume"):
        return None
    if not record or record.get("fingerprint") != step.fingerprint or record.get("status") == SUCCEEDED:
        return None
    out_dir = Path(meta.get("output_dir") or flag_value(step.args, "--output_dir") or "")
    name = meta.get("output_name") or flag_value(step.args, "--output_name")
    if not name or not out_dir.is_dir():
        return None
    progress = record.get("progress", {})
    spe = meta.get("steps_per_epoch") or progress.get("steps_per_epoch")
    total_steps = meta.get("max_train_steps") if not meta.get("max_train_epochs") else None
    total_epochs = meta.get("max_train_epochs")
    if total_steps is None:
        total_steps = progress.get("total") or (total_epochs * spe if total_epochs and spe else None)
    best = None  # (global step or -1, epoch, dir)
    for entry in out_dir.iterdir():
        m = STATE_DIR.match(entry.name)
        if not m or m["name"] != name or not entry.is_dir():
            continue
        if m["step"]:
            key = (int(m["step"]), None)
        else:
            epoch = int(m["epoch"])
            key = (epoch * spe if spe else -1, epoch)
        if best is None or key > best[:2]:
            best = (*key, entry)
    if best is None:
        return None
    done_steps, done_epochs, state_dir = best
    done_steps = None if done_steps < 0 else done_steps
    k = int(record.get("resumes", 0)) + 1
    attempt_name = f"{name}-resume{k}"
    args = set_flag(step.args, "--resume", str(state_dir))
    args = set_flag(args, "--output_name", attempt_name)
    if done_epochs is not None and total_epochs:  # an epoch state of an epoch-length run: count epochs
        left = total_epochs - done_epochs
        if left <= 0:
            return None
        args = set_flag(args, "--max_train_epochs", str(left))
        note = f"resumed from {state_dir.name}: {left} of {total_epochs} epochs left"
    elif done_steps is not None and total_steps:
        left = int(total_steps) - done_steps
        if left <= 0:
            return None
        # max_train_epochs would override max_train_steps inside musubi
        args = set_flag(remove_flag(args, "--max_train_epochs"), "--max_train_steps", str(left))
        note = f"resumed from {state_dir.name}: {left} of {total_steps} steps left"
    else:
        return None
    return Resume(str(state_dir), done_steps, done_epochs, args, attempt_name, note, out_dir, name)


def rename_resumed(res: Resume, spe: int | None) -> list[str]:
    """Give a resumed attempt's files the numbering of one uninterrupted run; never overwrite."""
    out_dir, name = res.out_dir, res.name
    notes = []
    epoch_offset = res.done_epochs if res.done_epochs is not None else (
        res.done_steps // spe if spe and res.done_steps is not None and res.done_steps % spe == 0 else None)
    pat = re.compile(rf"^{re.escape(res.attempt_name)}(?:-step(?P<step>\d{{8}})|-(?P<epoch>\d{{6}}))?(?P<rest>\.safetensors|-state)$")
    for entry in sorted(out_dir.iterdir()):
        m = pat.match(entry.name)
        if not m:
            continue
        if m["step"]:
            if res.done_steps is None:
                continue
            target = f"{name}-step{int(m['step']) + res.done_steps:08d}{m['rest']}"
        elif m["epoch"]:
            if epoch_offset is None:
                continue
            target = f"{name}-{int(m['epoch']) + epoch_offset:06d}{m['rest']}"
        else:
            target = f"{name}{m['rest']}"
        if (out_dir / target).exists():
            notes.append(f"kept {entry.name}: {target} already exists")
            continue
        os.replace(entry, out_dir / target)
        notes.append(f"{entry.name} -> {target}")
    return notes


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

    def __init__(self, config: MusubiConfig, grace_s: float | None = None, sleep: Callable[[float], None] | None = None):
        self.config = config
        self.grace_s = config.cancel_grace_s if grace_s is None else grace_s
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
            retry: RetryPolicy | None = None) -> RunResult:
        """Run the plan, holding its workdir's lock: one run of a pipeline at a time."""
        self.config.require()
        check_plan(plan, self.config)
        check_owner(plan)
        with RunLock(plan):
            claim(plan)
            # holding the lock, a step still "running" belongs to a run that died (kill -9, power)
            end_running_records(plan, "the run that ran this step ended without recording how (killed, or the machine stopped)")
            try:
                return self._run(plan, listeners, force, only, from_, until, retry)
            except BaseException as exc:  # a crash or an interrupt: the step was stopped, say so in the state
                end_running_records(plan, f"musubi-pipe stopped while this step ran: {type(exc).__name__}: {exc}")
                raise

    def _run(self, plan: Plan, listeners: Iterable[ev.Listener], force: bool, only: Iterable[str] | None,
             from_: str | None, until: str | None, retry: RetryPolicy | None) -> RunResult:
        chosen = select_steps(plan, only, from_, until)
        self._cancel.clear()
        self._listeners = list(listeners)
        self._retry = retry or RetryPolicy()
        self.state = StateFile(state_path(plan))
        self._write_generated(plan)
        exclude = made_by_plan(plan)

        to_run, stale, reasons = decide(plan, self.state, chosen, force, exclude)
        result = RunResult(SUCCEEDED, None)
        self.run_dir = None
        try:
            if to_run:
                self._open_run_dir(plan)
            self._emit(ev.Event(ev.PLAN, data={"steps": to_run, "skipped": [s.id for s in plan.steps if s.id not in to_run],
                                               "reasons": reasons, "run_dir": str(self.run_dir or "")}))
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
            result.run_dir = self.run_dir
            self._emit(ev.Event(ev.RUN_END, data={"status": result.status, "run_dir": str(self.run_dir or "")}))
        finally:
            if self._events_file is not None:
                self._events_file.close()
                self._events_file = None
        return result

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
        write_atomic(run_dir / "plan.json", plan.to_json())
        write_atomic(run_dir / "environment.json",
                          json.dumps(environment_facts(self.config), indent=2, ensure_ascii=False, default=str))
        (run_dir / "commands.txt").write_text("", encoding="utf-8")
        self._events_file = open(run_dir / "events.jsonl", "a", encoding="utf-8")

    def _note_command(self, step: Step, argv: list[str], env: dict, note: str) -> None:
        with open(self.run_dir / "commands.txt", "a", encoding="utf-8") as f:
            f.write(f"# {step.id}" + (f" ({note})" if note else "") + "\n")
            prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
            f.write((prefix + " " if prefix else "") + shlex.join(argv) + "\n\n")

    def _run_step(self, step: Step, exclude: list[str]) -> str:
        log_path = self.run_dir / f"{step.id}.log"
        previous = self.state.record(step.id)
        resume = plan_resume(step, previous)
        args, changes = list(step.args), []
        if resume:
            args = resume.args
            changes.append(resume.note)
        # what a later resume needs from earlier attempts with the same settings
        same = previous if previous and previous.get("fingerprint") == step.fingerprint else {}
        record = {
            "status": RUNNING, "fingerprint": step.fingerprint, "started": time.time(), "run": str(self.run_dir),
            "log": str(log_path), "inputs": input_identities(step, exclude),
            "needs": {n: stamp(self.state.record(n)) for n in step.needs},
            "progress": same.get("progress", {}), "resumes": same.get("resumes", 0) + (1 if resume else 0),
        }
        self.state.put(step.id, record)
        for out in step.outputs:  # musubi's savers do not create missing folders
            folder = Path(out.path) if out.pattern else Path(out.path).parent
            if out.path:
                folder.mkdir(parents=True, exist_ok=True)
        transient_left = self._retry.transient_tries if self._retry.enabled else 0
        oom_left = 1 if self._retry.enabled and self._retry.oom_retry else 0
        attempt = 0
        while True:
            attempt += 1
            known = dict(record["progress"])
            status, rc = self._attempt(step, args, log_path, attempt, changes, record)
            if resume:  # the attempt printed only the steps left: keep the whole run's length
                record["progress"] = {**record["progress"], **{k: known[k] for k in ("total", "epochs") if k in known}}
                spe = (step.meta or {}).get("steps_per_epoch") or record["progress"].get("steps_per_epoch")
                changes.extend(f"renamed {r}" for r in rename_resumed(resume, spe))
            missing = missing_outputs(step) if status == SUCCEEDED else []
            if status == SUCCEEDED and not missing:
                record["outputs"] = output_files(step)
                for o in record["outputs"]:
                    self._emit(ev.Event(ev.OUTPUT, step=step.id, data={"name": o["output"], "path": o["path"]}))
                if (step.meta or {}).get("batch_prompts"):
                    record["prompt_outputs"] = self._match_batch(step, record["started"])
                return self._end_step(step, record, SUCCEEDED, rc, log_path, changes)
            if status == CANCELLED:
                return self._end_cancelled(step, record, rc, log_path, changes)
            from .failures import classify, next_memory_setting

            # advice and retry both start from the settings this attempt ran with, not the plan's
            settings = _settings(args)
            failure = classify(_tail(log_path), rc, step.kind, {**(step.meta or {}), "family": step.family, "settings": settings})
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
            elif failure.category == "oom" and oom_left > 0:
                oom_left -= 1
                change = next_memory_setting(step.kind, settings, step.family)
                if change:
                    args, what = _apply_setting(args, change)
                    retry_note = f"out of memory; retrying once with {what}"
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
                 record: dict) -> tuple[str, int]:
        """One subprocess: start, pump output into log/parser/listeners, wait or cancel."""
        from .progress import ProgressParser

        run_step = replace(step, args=args)
        argv = run_step.command(str(self.config.python), str(self.config.musubi_dir))
        env = step_environment({**self.config.step_env(), **step.env, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"})
        cwd = step.cwd or str(Path(self.run_dir).parent.parent)
        self._note_command(step, argv, {**self.config.step_env(), **step.env}, "; ".join(changes) if changes else "")
        parser = ProgressParser(step.id, step.kind)
        with open(log_path, "ab") as log:
            header = f"=== musubi-pipe: {step.id} attempt {attempt}: {shlex.join(argv)}\n"
            if changes:
                header += "=== changes: " + "; ".join(changes) + "\n"
            log.write(header.encode("utf-8"))
            log.flush()
            self._emit(ev.Event(ev.STEP_START, step=step.id, data={
                "argv": argv, "log": str(log_path), "attempt": attempt, "changes": list(changes), "kind": step.kind,
                "output_dir": (step.meta or {}).get("output_dir", "")}))
            popen_kw: dict = {}
            if os.name == "nt":
                popen_kw["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
            else:
                popen_kw["start_new_session"] = True  # its own process group: one signal reaches the tree
            try:
                proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, **popen_kw)
            except OSError as exc:
                log.write(f"cannot start: {exc}\n".encode())
                return FAILED, 127
            log_lock, parse_lock = threading.Lock(), threading.Lock()

            def deliver(parse: Callable[[], list[ev.Event]]) -> None:
                # both streams feed one parser (its phase is shared): emit under the same lock, so
                # events leave in the order they were read
                with parse_lock:
                    for e in parse():
                        self._note_progress(record, e)
                        self._emit(e)

            def pump(name: str, pipe) -> None:
                decoder = codecs.getincrementaldecoder("utf-8")("replace")
                fd = pipe.fileno()
                while True:
                    try:
                        chunk = os.read(fd, 65536)  # returns what is there: no waiting for a full line
                    except OSError:
                        break
                    if not chunk:
                        break
                    with log_lock:
                        try:
                            log.write(chunk)
                            log.flush()
                        except ValueError:  # closed: musubi-pipe is failing and left the step
                            break
                    text = decoder.decode(chunk)
                    if text:
                        deliver(lambda: parser.feed(name, text))
                rest = decoder.decode(b"", final=True)
                if rest:
                    deliver(lambda: parser.feed(name, rest))

            threads = [threading.Thread(target=pump, args=(n, p), daemon=True)
                       for n, p in (("stdout", proc.stdout), ("stderr", proc.stderr))]
            for t in threads:
                t.start()
            watchdog = Watchdog.start(proc.pid, self.grace_s)
            cancelled = ended = False
            try:
                try:
                    while True:
                        try:
                            rc = proc.wait(timeout=0.05)
                            break
                        except subprocess.TimeoutExpired:
                            if self._cancel.is_set():
                                cancelled = True
                                rc = self._stop(proc)
                                break
                except KeyboardInterrupt:  # no signal handler installed by the caller: same as cancel()
                    self._cancel.set()
                    cancelled = True
                    rc = self._stop(proc)
                _kill_group(proc.pid)  # nothing the step started may outlive it
                ended = True
            finally:
                if not ended:  # musubi-pipe itself is failing: the step must not outlive the error
                    try:
                        self._stop(proc)
                        _kill_group(proc.pid)
                        ended = True
                    except BaseException:  # a second interrupt: the watchdog ends what is left
                        pass
                watchdog.close(done=ended)
            for t in threads:
                t.join(timeout=5)
            deliver(parser.flush)  # an unterminated last line is still a line
            for pipe in (proc.stdout, proc.stderr):
                pipe.close()
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
        if e.kind == ev.PROGRESS and e.phase == "training" and e.total:
            prog = record.setdefault("progress", {})
            prog["total"] = e.total
            if e.epochs:
                prog["epochs"] = e.epochs
                prog["steps_per_epoch"] = e.total // e.epochs if e.total % e.epochs == 0 else prog.get("steps_per_epoch")
        steps_per_epoch = (e.data or {}).get("steps_per_epoch")
        if steps_per_epoch:
            record.setdefault("progress", {})["steps_per_epoch"] = steps_per_epoch

    def _stop(self, proc: subprocess.Popen) -> int:
        """Polite signal to the whole process group, then SIGKILL after the grace period, also
        for descendants that left the group."""
        import psutil

        try:
            tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if os.name == "nt":
            try:
                proc.send_signal(signal.CTRL_BREAK_EVENT)
            except OSError:
                pass
        else:
            _signal_group(proc.pid, signal.SIGTERM)
        alive = _wait_dead(tree, self.grace_s)
        if alive:
            _kill_group(proc.pid)
            for p in alive:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            _wait_dead(alive, 5.0)
        return proc.wait()


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


def _wait_dead(procs: list, timeout: float) -> list:
    """Wait until every process has exited; a zombie counts as exited (it runs nothing, and
    an orphan's zombie is reaped by init whenever init gets to it). Returns those still alive."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.01)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(pid: int) -> None:
    if os.name != "nt":
        _signal_group(pid, signal.SIGKILL)


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
        return f.read().decode("utf-8", "replace")


def _settings(args: list[str]) -> dict:
    """The memory-related settings a step runs with, as the failure module's vocabulary."""
    settings: dict = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            key = a[2:]
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                settings[key] = args[i + 1]
                i += 2
                continue
            settings[key] = True
        i += 1
    return settings


def _apply_setting(args: list[str], change) -> tuple[list[str], str]:
    """Apply a MemorySetting from next_memory_setting to the argv: add or replace its flag and
    the flags that must come with it (fp8_scaled needs fp8_base)."""
    words = []
    for name, value in [(change.field, change.value), *change.also]:
        word = None if value is None or value is True else str(value)  # `1 in (None, True)` is true
        args = set_flag(args, "--" + name, word)
        words.append(" ".join(filter(None, ["--" + name, word])))
    return args, " ".join(words) + (f": {change.explanation}" if change.explanation else "")
