"""The state file beside a pipeline (like DVC's lock file): what each step last ran with and
made, so an unchanged step is skipped and a changed one re-runs with everything after it."""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import stat
import threading
import time
from pathlib import Path

from ..files import write_atomic
from ..compiler.plan import Plan, Step

VERSION = 1
HASH_LIMIT = 1 << 20  # files up to 1 MiB (generated TOML, prompts, captions) are hashed; models never

SUCCEEDED, FAILED, CANCELLED, RUNNING = "succeeded", "failed", "cancelled", "running"


def state_path(plan: Plan) -> Path:
    """`pipeline.toml` -> `pipeline.musubi-lock.json` beside it (or in the workdir without a file)."""
    if plan.source:
        src = Path(plan.source)
        return src.with_name(f"{src.stem}.musubi-lock.json")
    return Path(plan.workdir) / f"{plan.name or 'pipeline'}.musubi-lock.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_identity(path: str | Path) -> dict:
    """Path, size and mtime_ns; small files also their hash, so rewriting equal content is no change."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"path": str(p), "missing": True}
    if stat.S_ISDIR(st.st_mode):
        return {"path": str(p), "dir": True}
    ident = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if st.st_size <= HASH_LIMIT:
        ident["sha256"] = sha256_file(p)
    return ident


def same_file(a: dict, b: dict) -> bool:
    if a.get("missing") or b.get("missing") or a.get("path") != b.get("path"):
        return False
    if a.get("dir") or b.get("dir"):
        return bool(a.get("dir")) == bool(b.get("dir"))
    if "sha256" in a and "sha256" in b:
        return a["sha256"] == b["sha256"] and a["size"] == b["size"]
    return a.get("size") == b.get("size") and a.get("mtime_ns") == b.get("mtime_ns")


def made_by_plan(plan: Plan) -> list[str]:
    """Glob patterns of everything the plan's steps write, and the run records: a folder input's
    identity leaves these out, so a step writing caches into its dataset folder is not 'changed'."""
    pats = [str(Path(plan.workdir) / "runs"), str(Path(plan.workdir) / ".musubi-pipe"), str(state_path(plan))]
    for step in plan.steps:
        for out in step.outputs:
            pats.append(os.path.join(out.path, out.pattern) if out.pattern else out.path)
    return pats


def _excluded(path: str, patterns: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/\\") + os.sep) or fnmatch.fnmatch(path, p) for p in patterns)


def dir_identity(path: str | Path, exclude: list[str] = ()) -> dict:
    """A folder as a digest of its files' (relative path, size, mtime_ns): stat only, no reading."""
    root = Path(path)
    if not root.is_dir():
        return file_identity(root)
    h = hashlib.sha256()
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if exclude and _excluded(full, exclude):
                continue
            try:
                st = os.stat(full)
            except OSError:
                continue
            h.update(f"{os.path.relpath(full, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            count += 1
    return {"path": str(root), "dir": True, "files": count, "digest": h.hexdigest()[:32]}


def _setting_changes(step: Step, old_args: list[str] | None) -> str:
    """': network_dim 16 -> 32, fp8_base off -> on' from the argv the step last ran with (as musubi's
    recorded parser reads both); '' when they are the same or unknown."""
    from ..compiler import contract

    if not old_args:
        return ""
    try:
        parser = contract.parser(step.script)
        old, new = vars(parser.parse_args(old_args)), vars(parser.parse_args(step.args))
    except contract.ContractError:
        return "" if old_args == step.args else ": the command changed"

    def shown(value) -> str:
        if value is None or isinstance(value, bool):
            return {True: "on", False: "off", None: "unset"}[value]
        return " ".join(map(str, value)) if isinstance(value, list) else str(value)  # nargs options parse to lists

    changes = [f"{k} {shown(old.get(k))} -> {shown(new.get(k))}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not changes:
        return " (a generated file, the launch settings or an upstream step's settings)"
    return ": " + ", ".join(changes[:6]) + (f" and {len(changes) - 6} more" if len(changes) > 6 else "")


def _identity_change(old: dict | None, new: dict) -> str:
    if old is None:
        return " (new)"
    if new.get("missing"):
        return " (gone)"
    if "files" in old and "files" in new and old["files"] != new["files"]:
        return f" ({old['files']} -> {new['files']} files)"
    if "files" in new:
        return " (a file in it changed)"
    if old.get("size") != new.get("size"):
        return f" (size {old.get('size')} -> {new.get('size')} bytes)"
    return " (content changed)" if "sha256" in new else " (modified)"


def same_identity(a: dict, b: dict) -> bool:
    if "digest" in a or "digest" in b:
        return a.get("path") == b.get("path") and a.get("digest") == b.get("digest")
    return same_file(a, b)


def input_identities(step: Step, exclude: list[str]) -> list[dict]:
    """Identities of the files the user supplies; inputs made by other steps are covered by the
    upstream step's stamp instead."""
    out = []
    for inp in step.inputs:
        if inp.from_step or not inp.path:  # made upstream, or a slot the stage leaves empty
            continue
        p = Path(inp.path)
        out.append(dir_identity(p, exclude) if p.is_dir() else file_identity(p))
    return out


def output_files(step: Step) -> list[dict]:
    """What the step's outputs are now: one identity per file (globs expanded), or the folder."""
    found = []
    for out in step.outputs:
        if out.pattern:
            for f in sorted(glob.glob(os.path.join(glob.escape(out.path), out.pattern))):
                found.append(file_identity(f) | {"output": out.name})
        else:
            found.append(file_identity(out.path) | {"output": out.name})
    return [f for f in found if not f.get("missing")]


# Kinds whose step keeps files an earlier run made (`--skip_existing` caches): for them an output
# that was already there still counts.
KEEPS_EXISTING = ("cache_latents", "cache_text_encoder")


def _sig(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def output_snapshot(step: Step) -> dict[str, tuple]:
    """The files a step's outputs name now (globs expanded), before it runs."""
    snap = {}
    for out in step.outputs:
        paths = glob.glob(os.path.join(glob.escape(out.path), out.pattern)) if out.pattern else [out.path]
        for path in paths:
            sig = _sig(path)
            if sig is not None:
                snap[path] = sig
    return snap


def missing_outputs(step: Step, before: dict[str, tuple] | None = None) -> list[str]:
    """Required outputs that do not exist (a glob output needs at least one match). With `before`
    (output_snapshot at the step's start), a file that is still the one that was there then is
    not this step's output: it is listed as missing too."""
    def new(path: str) -> bool:
        return before is None or step.kind in KEEPS_EXISTING or before.get(path) != _sig(path)

    missing = []
    for out in step.outputs:
        if not out.required:
            continue
        if out.pattern:
            found = glob.glob(os.path.join(glob.escape(out.path), out.pattern))
            if not found:
                missing.append(os.path.join(out.path, out.pattern))
            elif not any(new(f) for f in found):
                missing.append(f"{os.path.join(out.path, out.pattern)} (only files older than this run match)")
        elif not os.path.exists(out.path):
            missing.append(out.path)
        elif not new(out.path):
            missing.append(f"{out.path} (the file there is older than this run)")
    return missing


def stamp(record: dict | None) -> str:
    """What downstream steps remember of this one: its fingerprint and what it made."""
    if not record:
        return ""
    blob = json.dumps([record.get("fingerprint"), record.get("outputs")], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class StateFile:
    """Load, query and atomically rewrite the lock file. Not shared between processes; shared
    between the threads of one run (parallel steps): `put` keeps a copy of the record, and writes
    happen one at a time, so the file always holds whole records."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self.data: dict = {"version": VERSION, "steps": {}, "generated": {}}
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                loaded = None  # an unreadable lock file means "nothing is known": everything re-runs
            if isinstance(loaded, dict) and loaded.get("version") == VERSION:
                self.data = {**self.data, **loaded}

    @property
    def steps(self) -> dict[str, dict]:
        return self.data["steps"]

    @property
    def generated(self) -> dict[str, str]:
        return self.data["generated"]

    def record(self, step_id: str) -> dict | None:
        return self.steps.get(step_id)

    def put(self, step_id: str, record: dict) -> None:
        # a copy: the step's thread goes on changing its record while another thread saves
        copied = json.loads(json.dumps(record, ensure_ascii=False, default=str))
        with self._lock:
            self.steps[step_id] = copied
            self.save()

    def save(self) -> None:
        with self._lock:
            self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            text = json.dumps(self.data, indent=1, ensure_ascii=False)
            write_atomic(self.path, text)

    def why_stale(self, step: Step, exclude: list[str], stale_needs: set[str]) -> str | None:
        """None when the step is up to date, else the reason it must run, in the user's words."""
        rec = self.record(step.id)
        if not rec:
            return "never ran"
        if rec.get("status") != SUCCEEDED:
            return f"last run {rec.get('status', 'unknown')}"
        if rec.get("fingerprint") != step.fingerprint:
            return "settings changed" + _setting_changes(step, rec.get("args"))
        for need in step.needs:
            if need in stale_needs:
                return f"{need} runs first"
            if rec.get("needs", {}).get(need) != stamp(self.record(need)):
                return f"{need} changed since"
        recorded = {i["path"]: i for i in rec.get("inputs", [])}
        for ident in input_identities(step, exclude):
            old = recorded.get(ident["path"])
            if old is None or not same_identity(old, ident):
                return f"input changed: {ident['path']}" + _identity_change(old, ident)
        now = {o["path"]: o for o in output_files(step)}
        for old in rec.get("outputs", []):
            cur = now.get(old["path"])
            if cur is None:
                return f"output missing: {old['path']}"
            if not same_identity(old, cur):
                return f"output changed: {old['path']}"
        missing = missing_outputs(step)
        return f"output missing: {missing[0]}" if missing else None
