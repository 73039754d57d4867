"""Resuming an interrupted training step from a state folder musubi saved, only where the result is
the run an uninterrupted one would have made.

What musubi-tuner 30c658c does on `--resume <state>` (training/trainer_base.py): it builds the
learning-rate schedule from `--max_train_steps` (after the `--max_train_epochs` override), then
`accelerator.load_state` restores the weights, the optimizer, the scheduler's step counter and the
RNG; its own loop starts again at global step 0 and epoch 0 ("TODO skip until initial step"; there
is no `--initial_step`). So the resumed attempt gets the steps that are left as its length, and
that is the uninterrupted run only when
- the state belongs to these settings and inputs (a tag file musubi-pipe writes beside each state
  folder it saw appear, holding the step's resume key),
- the schedule's factor at a step does not depend on the run's length (constant, warmup with a
  whole number of steps, ...; a cosine or linear schedule would be rebuilt for the steps left),
- the state lies on an epoch boundary (the loop restarts the epoch's batch order).
Otherwise training starts again from step 0, and the step says why. The attempt writes under a
temporary `--output_name` (`<name>-resume<k>`); its files are then renamed to the numbering of one
run, their `ss_*` metadata and its TensorBoard steps say the whole run's steps and epochs.

What no argv of 30c658c fixes: each epoch's batch order is shuffled with `random.seed(dataset seed
+ epoch number)` and the epoch number restarts at 1, so with more than one batch an epoch the
resumed epochs see the batches in the order of the run's first epochs (same schedule, same items
per epoch, other weights; with one batch an epoch the weights are bit-identical, measured).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from ..compiler.plan import Step, fingerprint, flag_value
from ..files import atomic_path, write_atomic
from ..pipelines import registry
from ..pipelines.registry import option

STATE_DIR = re.compile(r"^(?P<name>.+?)-(?:step(?P<step>\d{8})|(?P<epoch>\d{6}))-state$")
TAG_SUFFIX = ".musubi-pipe.json"  # beside `<state folder>`: which step and settings saved it


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
    total_steps: int | None = None  # the whole run's length, for the renamed files' metadata
    total_epochs: int | None = None  # the whole run's epochs, also for a run of a number of steps

    def to_record(self) -> dict:
        return {"state_dir": self.state_dir, "done_steps": self.done_steps, "done_epochs": self.done_epochs,
                "attempt_name": self.attempt_name, "out_dir": str(self.out_dir), "name": self.name,
                "total_steps": self.total_steps, "total_epochs": self.total_epochs}

    @classmethod
    def from_record(cls, data: dict) -> "Resume":
        return cls(data["state_dir"], data.get("done_steps"), data.get("done_epochs"), [], data["attempt_name"], "",
                   Path(data["out_dir"]), data["name"], data.get("total_steps"), data.get("total_epochs"))


# ------------------------------------------------------------------------------ argv helpers



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


def set_flag(args: list[str], flag: str, value: str | None = None) -> list[str]:
    """A copy of args with `flag` (and its value, if given) set, replacing an existing value."""
    out = remove_flag(args, flag, takes_value=value is not None)
    return out + ([flag, value] if value is not None else [flag])


# ------------------------------------------------------------------- which states may be used


def resume_key(record: dict) -> str:
    """What a state must have been saved under to be resumed: the step's settings (fingerprint),
    what its upstream steps made and its own input files, as the state file records them (a small
    file by its content, as `same_file` compares it: rewriting equal content changes nothing)."""
    inputs = [{k: v for k, v in i.items() if not ("sha256" in i and k == "mtime_ns")} for i in record.get("inputs") or []]
    return fingerprint(record.get("fingerprint"), record.get("needs"), inputs)


def schedule_blocker(args: list[str]) -> str | None:
    """Why a resumed attempt (length = the steps left) would not follow the whole run's learning
    rates, or None when it does."""
    training = registry.training()
    if flag_value(args, option("lr_scheduler_type")):
        return None  # a class with explicit arguments: nothing is derived from the length
    if (flag_value(args, option("optimizer_type")) or "").lower().endswith(training["schedule_free_optimizer_suffix"]):
        return None  # musubi replaces the schedule with a constant dummy
    name = flag_value(args, option("lr_scheduler")) or training["length_free_schedules"][0]
    if name.startswith(training["length_free_schedule_prefix"]):
        return None
    if name not in training["length_free_schedules"]:
        return f"musubi builds the {name} schedule from the number of steps it is given and cannot start at a later step"
    warmup = flag_value(args, option("lr_warmup_steps")) or "0"
    if name != training["length_free_schedules"][0] and not re.fullmatch(r"\d+", warmup):
        return f"lr_warmup_steps {warmup} is a fraction of the number of steps musubi is given"
    return None


def state_dirs(out_dir: Path, name: str) -> list[tuple[int | None, int | None, Path]]:
    """(step, epoch, folder) of the intermediate state folders `name` has in `out_dir`."""
    found = []
    try:
        entries = list(out_dir.iterdir())
    except OSError:
        return found
    for entry in entries:
        m = STATE_DIR.match(entry.name)
        if m and m["name"] == name and entry.is_dir():
            found.append((int(m["step"]) if m["step"] else None, int(m["epoch"]) if m["epoch"] else None, entry))
    return found


def _signature(folder: Path) -> list:
    sig = []
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            st = f.stat()
        except OSError:
            continue
        sig.append([f.name, st.st_size, st.st_mtime_ns])
    return sig


def snapshot_states(out_dir: Path, name: str) -> dict[str, list]:
    """Every `<name>...-state` folder now, with its files' sizes and times: folders that are new
    or changed after an attempt were saved by it."""
    out = {}
    try:
        entries = list(out_dir.iterdir())
    except OSError:
        return out
    for entry in entries:
        if entry.name.startswith(name) and entry.name.endswith("-state") and entry.is_dir():
            out[entry.name] = _signature(entry)
    return out


def read_tag(state_dir: Path) -> dict | None:
    try:
        data = json.loads(Path(str(state_dir) + TAG_SUFFIX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def tag_new_states(out_dir: Path, name: str, before: dict[str, list], key: str, step_id: str) -> list[str]:
    """Write the tag of each state folder of `name` that appeared or changed since `before` and is
    complete (accelerate writes the RNG states last: a folder cut short without them is not used)."""
    tagged = []
    for folder_name, sig in snapshot_states(out_dir, name).items():
        if folder_name in before and before[folder_name] == sig:
            continue
        if not any(f[0].startswith("random_states_") for f in sig):
            continue
        write_atomic(out_dir / (folder_name + TAG_SUFFIX), json.dumps({"step": step_id, "key": key}) + "\n")
        tagged.append(folder_name)
    return sorted(tagged)


def plan_resume(step: Step, record: dict, previous: dict | None) -> tuple[Resume | None, str | None]:
    """For a training step that saves state: the exact resume from the newest usable state, or
    None; with a note saying what was resumed, or why an existing state was not."""
    meta = step.meta or {}
    if step.kind not in registry.TRAINING_KINDS or not meta.get("save_state") or flag_value(step.args, option("resume")):
        return None, None
    out_dir = Path(meta.get("output_dir") or flag_value(step.args, option("output_dir")) or "")
    name = meta.get("output_name") or flag_value(step.args, option("output_name"))
    if not name or not out_dir.is_dir():
        return None, None
    key = resume_key(record)
    ours = [(s, e, d) for s, e, d in state_dirs(out_dir, name) if (read_tag(d) or {}).get("key") == key]
    if not ours:
        return None, None
    same = previous if previous and previous.get("key") == key else {}
    progress = same.get("progress", {})
    spe = meta.get("steps_per_epoch") or progress.get("steps_per_epoch")
    total_epochs = meta.get("max_train_epochs")
    total_steps = meta.get("max_train_steps") if not total_epochs else (total_epochs * spe if spe else None)
    if total_steps is None and not total_epochs:
        total_steps = progress.get("total")
    candidates = []  # (done steps, done epochs, folder), whole epochs only
    for s, e, d in ours:
        if e is not None:
            candidates.append((e * spe if spe else None, e, d))
        elif spe and s % spe == 0:
            candidates.append((s, s // spe, d))
    newest = max(ours, key=lambda t: t[0] if t[0] is not None else (t[1] or 0) * (spe or 0)
                 ).__getitem__(2).name
    blocker = schedule_blocker(step.args)
    if blocker:
        return None, f"not resumed from {newest}: {blocker}; training starts again from step 0"
    if not candidates:
        why = "its step is not at the end of an epoch" if spe else "the number of steps per epoch is not known yet"
        return None, (f"not resumed from {newest}: {why} (musubi starts the epoch's batch order again on --resume); "
                      "training starts again from step 0")
    done_steps, done_epochs, state_dir = max(candidates, key=lambda c: (c[1], c[0] or 0))
    if total_epochs:
        left = total_epochs - done_epochs
        args = set_flag(step.args, option("max_train_epochs"), str(left))
        note = f"resumed from {state_dir.name}: {left} of {total_epochs} epochs left"
    elif total_steps and done_steps is not None:
        left = int(total_steps) - done_steps
        # max_train_epochs would override max_train_steps inside musubi
        args = set_flag(remove_flag(step.args, option("max_train_epochs")), option("max_train_steps"), str(left))
        note = f"resumed from {state_dir.name}: {left} of {total_steps} steps left"
    else:
        return None, None
    if left <= 0:  # the run was stopped while saving its results: they cannot be vouched for
        return None, (f"not resumed from {state_dir.name}: it is the end of the run, saved when the run was stopped; "
                      "training starts again from step 0")
    if state_dir.name != newest:
        note += f" (the newest state at the end of an epoch; {newest} is not)"
    k = int(same.get("resumes", 0)) + 1
    attempt_name = f"{name}-resume{k}"
    args = set_flag(set_flag(args, option("resume"), str(state_dir)), option("output_name"), attempt_name)
    whole_epochs = total_epochs or (-(-int(total_steps) // spe) if total_steps and spe else None)
    return Resume(str(state_dir), done_steps, done_epochs, args, attempt_name, note, out_dir, name,
                  int(total_steps) if total_steps else None, whole_epochs), None


# ----------------------------------------------------------------------- after the attempt


def rename_resumed(res: Resume, spe: int | None) -> list[str]:
    """Give a resumed attempt's files the numbering of one uninterrupted run. A file of that name
    already there was not made by this run (states of other settings are never resumed, and this
    run's own files precede the resumed state): the attempt's file replaces it."""
    out_dir, name = res.out_dir, res.name
    notes = []
    epoch_offset = res.done_epochs if res.done_epochs is not None else (
        res.done_steps // spe if spe and res.done_steps is not None and res.done_steps % spe == 0 else None)
    pat = re.compile(rf"^{re.escape(res.attempt_name)}(?:-step(?P<step>\d{{8}})|-(?P<epoch>\d{{6}}))?(?P<rest>\.safetensors|-state)$")
    try:
        entries = sorted(out_dir.iterdir())
    except OSError:
        return notes
    for entry in entries:
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
        dest = out_dir / target
        replaced = dest.exists()
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        if m["rest"] == ".safetensors":
            _whole_run_metadata(entry, res, epoch_offset)
        os.replace(entry, dest)
        notes.append(f"{entry.name} -> {target}" + (" (replaced an older file)" if replaced else ""))
    return notes


def _whole_run_metadata(path: Path, res: Resume, epoch_offset: int | None) -> None:
    """musubi writes the attempt's own counts (`ss_steps` from 0, its `--output_name`): rewrite
    them as the uninterrupted run's. Only the header changes; the tensors are copied as they are."""
    def edit(meta: dict) -> dict:
        out = dict(meta)
        for key, offset in (("ss_steps", res.done_steps), ("ss_epoch", epoch_offset)):
            if offset is not None and str(out.get(key, "")).isdigit():
                out[key] = str(int(out[key]) + offset)
        for key in ("ss_output_name", "modelspec.title"):
            if out.get(key) == res.attempt_name:
                out[key] = res.name
        if res.total_steps:
            out["ss_max_train_steps"] = str(res.total_steps)
        if res.total_epochs:
            out["ss_num_epochs"] = str(res.total_epochs)
        return out

    rewrite_safetensors_metadata(path, edit)


def rewrite_safetensors_metadata(path: Path, edit) -> None:
    with open(path, "rb") as src:
        head = src.read(8)
        if len(head) < 8:
            return
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(src.read(n))
        except ValueError:
            return  # not a safetensors file musubi wrote: leave it alone
        meta = header.get("__metadata__") or {}
        new = edit(meta)
        if new == meta:
            return
        header["__metadata__"] = new
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # the data that follows stays 8-byte aligned
        with atomic_path(path) as tmp, open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(blob)) + blob)
            shutil.copyfileobj(src, dst, 1 << 20)


def finish_leftovers(previous: dict | None) -> list[str]:
    """A run that ended without finishing its own bookkeeping (musubi-pipe killed, the machine
    lost): rename the `-resume<k>` files its resumed attempt left, and tag the state folders it
    saved, so the next run can use them."""
    if not previous:
        return []
    notes = []
    attempt = previous.get("attempt")
    if attempt:
        res = Resume.from_record(attempt)
        spe = (previous.get("progress") or {}).get("steps_per_epoch")
        notes += [f"renamed {r} (left by an earlier run)" for r in rename_resumed(res, spe)]
    before, where = previous.get("states_before"), previous.get("states_where")
    if before is not None and where and previous.get("key"):
        out_dir, name = Path(where[0]), where[1]
        for folder in tag_new_states(out_dir, name, _untagged_view(out_dir, name, before), previous["key"], previous.get("step", "")):
            notes.append(f"{folder} was saved by the earlier run with these settings")
    return notes


def _untagged_view(out_dir: Path, name: str, before: dict[str, list]) -> dict[str, list]:
    """`before`, plus every folder that already has a tag: those are never tagged again."""
    view = dict(before)
    for folder_name, sig in snapshot_states(out_dir, name).items():
        if read_tag(out_dir / folder_name) is not None:
            view[folder_name] = sig
    return view


def event_files(logging_dir: Path | None) -> set[Path]:
    """TensorBoard event files under musubi's --logging_dir (one folder per attempt)."""
    if not logging_dir or not logging_dir.is_dir():
        return set()
    return set(logging_dir.rglob("events.out.tfevents*"))


def shift_event_steps(path: Path, res: Resume) -> int:
    """musubi logs a resumed attempt's scalars from step 1 (`loss/epoch` from epoch 1): rewrite the
    attempt's event file with the whole run's steps. Returns the number of events changed."""
    from ..tools.monitor import _enc_varint, _fields, frame_record

    data = path.read_bytes()
    out, pos, changed = bytearray(), 0, 0
    while pos + 12 <= len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + n + 4
        if end > len(data):
            break  # a record still being written when the attempt ended: kept as it is
        event = data[pos + 12:pos + 12 + n]
        pos = end
        try:
            fields = list(_fields(event))
        except (ValueError, IndexError):
            out += frame_record(event)
            continue
        summary = [v for num, wire, v in fields if num == 5 and wire == 2]
        if not summary:
            out += frame_record(event)
            continue
        per_epoch = b"loss/epoch" in summary[0]  # musubi logs it alone, at step = epoch
        offset = (res.done_epochs if per_epoch else res.done_steps) or 0
        step = next((v for num, wire, v in fields if num == 2 and wire == 0), 0)
        rebuilt = bytearray()
        for num, wire, value in fields:
            if num == 2 and wire == 0:
                continue
            rebuilt += _enc_varint(num << 3 | wire)
            if wire == 0:
                rebuilt += _enc_varint(value)
            elif wire == 2:
                rebuilt += _enc_varint(len(value)) + value
            else:
                rebuilt += value
            if num == 1:  # the step follows wall_time, as TensorBoard writes it
                rebuilt += _enc_varint(2 << 3) + _enc_varint(step + offset)
        out += frame_record(bytes(rebuilt))
        changed += 1
    out += data[pos:]
    if changed:
        write_atomic(path, bytes(out))
    return changed
