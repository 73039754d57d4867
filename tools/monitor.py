"""Training monitor: loss, learning rate, progress and samples from a run's events.jsonl and musubi's
TensorBoard logs, read incrementally, with TensorBoard-style smoothing and a PIL chart."""
from __future__ import annotations

import json
import math
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

LOSS_TAGS = ("loss/current", "loss/average", "loss/epoch")
LR_TAG = "lr/unet"
# {output_name}_{e000001|000100}_{NN}_{YYYYmmddHHMMSS}[_{seed}].png|.mp4
SAMPLE_NAME = re.compile(r"^(?:(?P<name>.+)_)?(?P<epoch>e)?(?P<n>\d{6})_(?P<index>\d{2})_(?P<time>\d{14})(?:_(?P<seed>\d+))?\.(?:png|mp4|webm|gif)$")

# ---- crc32c (Castagnoli), masked as TFRecord does ------------------------------------------

def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """Pure-Python crc32c: fine for the 8-byte length headers and for test files; the monitor does
    not check payload CRCs by default, because at ~5 MB/s it would dominate reading a large log."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---- minimal protobuf for tf.Event / Summary / TensorProto -----------------------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message; length-delimited values are bytes."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value = buf[pos:pos + 8]
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value = buf[pos:pos + n]
            pos += n
        elif wire == 5:
            value = buf[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _tensor_scalar(buf: bytes) -> float | None:
    dtype, content, floats, doubles, ints = 0, b"", [], [], []
    for number, wire, value in _fields(buf):
        if number == 1:
            dtype = value
        elif number == 4:
            content = value
        elif number == 5:  # float_val, packed or not
            floats += struct.unpack(f"<{len(value) // 4}f", value) if wire == 2 else struct.unpack("<f", value)
        elif number == 6:
            doubles += struct.unpack(f"<{len(value) // 8}d", value) if wire == 2 else struct.unpack("<d", value)
        elif number in (7, 10) and wire == 0:
            ints.append(value)
    if floats:
        return floats[0]
    if doubles:
        return doubles[0]
    if content:
        if dtype == 1 and len(content) >= 4:
            return struct.unpack_from("<f", content)[0]
        if dtype == 2 and len(content) >= 8:
            return struct.unpack_from("<d", content)[0]
    if ints:
        return float(ints[0])
    return None


_DOUBLE = struct.Struct("<d").unpack_from
_FLOAT = struct.Struct("<f").unpack_from


def _decode_simple(data: bytes) -> tuple[float, int, str, float] | None:
    """Fast path for the one layout torch's SummaryWriter writes for add_scalar: wall_time, step,
    and a summary with one simple_value. None for anything else (the general decoder handles it)."""
    found = _decode_simple_at(data, 0, len(data))
    if found is None:
        return None
    wall, step, tag_start, tag_end, value = found
    return wall, step, data[tag_start:tag_end].decode("utf-8", "replace"), value


def _decode_simple_at(buf: bytes, start: int, end: int) -> tuple[float, int, int, int, float] | None:
    """_decode_simple on the record buf[start:end], read in place (the reader copies no record out
    of its read block): (wall, step, where the tag starts and ends in buf, value)."""
    if end - start < 20 or buf[start] != 0x09 or buf[start + 9] != 0x10:
        return None
    step, pos = _varint(buf, start + 10)
    # summary (field 5) > value (field 1) > tag (field 1), simple_value (field 2, fixed32); each
    # length fits one byte for a scalar event
    if pos + 6 > end or buf[pos] != 0x2A or buf[pos + 2] != 0x0A or buf[pos + 4] != 0x0A:
        return None
    n_summary, n_value, n_tag = buf[pos + 1], buf[pos + 3], buf[pos + 5]
    tag_end = pos + 6 + n_tag
    if (n_summary >= 0x80 or n_value >= 0x80 or n_tag >= 0x80 or pos + 2 + n_summary != end
            or n_summary != n_value + 2 or n_value != n_tag + 7 or buf[tag_end] != 0x15):
        return None
    if step >= 1 << 63:
        step -= 1 << 64
    return _DOUBLE(buf, start + 1)[0], step, pos + 6, tag_end, _FLOAT(buf, tag_end + 1)[0]


def decode_event(data: bytes, tags: frozenset | None = None) -> tuple[float, int, list[tuple[str, float]]]:
    """(wall_time, step, [(tag, value)...]) of one serialized tf.Event; scalars come from
    simple_value (torch's SummaryWriter, which accelerate uses) or from a scalar tensor."""
    fast = _decode_simple(data)
    if fast is not None:
        wall, step, tag, value = fast
        return wall, step, [(tag, value)] if tags is None or tag in tags else []
    return _decode_general(data, tags)


def _decode_general(data: bytes, tags: frozenset | None) -> tuple[float, int, list[tuple[str, float]]]:
    wall, step, values = 0.0, 0, []
    for number, wire, value in _fields(data):
        if number == 1 and wire == 1:
            wall = struct.unpack("<d", value)[0]
        elif number == 2 and wire == 0:
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 5 and wire == 2:  # summary
            for n2, w2, v in _fields(value):
                if n2 != 1 or w2 != 2:
                    continue
                tag, scalar = "", None
                for n3, w3, x in _fields(v):
                    if n3 == 1:
                        tag = x.decode("utf-8", "replace")
                        if tags is not None and tag not in tags:
                            break
                    elif n3 == 2 and w3 == 5:
                        scalar = struct.unpack("<f", x)[0]
                    elif n3 == 8 and w3 == 2 and scalar is None:
                        scalar = _tensor_scalar(x)
                if tag and scalar is not None and (tags is None or tag in tags):
                    values.append((tag, scalar))
    return wall, step, values


def encode_event(wall_time: float, step: int, scalars: dict[str, float] | None = None, file_version: str = "") -> bytes:
    """A serialized tf.Event with simple_value scalars (what torch's SummaryWriter writes)."""
    def key(number, wire):
        return _enc_varint(number << 3 | wire)

    out = key(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += key(2, 0) + _enc_varint(step & ((1 << 64) - 1))
    if file_version:
        fv = file_version.encode()
        out += key(3, 2) + _enc_varint(len(fv)) + fv
    if scalars:
        summary = b""
        for tag, value in scalars.items():
            t = tag.encode()
            v = key(1, 2) + _enc_varint(len(t)) + t + key(2, 5) + struct.pack("<f", value)
            summary += key(1, 2) + _enc_varint(len(v)) + v
        out += key(5, 2) + _enc_varint(len(summary)) + summary
    return out


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def frame_record(data: bytes) -> bytes:
    """TFRecord framing: length, masked crc of length, data, masked crc of data."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


class EventFileWriter:
    """A small TensorBoard event-file writer (for tests and benchmarks; musubi writes the real ones)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        if self._file.tell() == 0:
            self.write_raw(encode_event(time.time(), 0, file_version="brain.Event:2"))

    def add_scalars(self, step: int, scalars: dict[str, float], wall_time: float | None = None) -> None:
        self.write_raw(encode_event(time.time() if wall_time is None else wall_time, step, scalars))

    def write_raw(self, data: bytes) -> None:
        self._file.write(frame_record(data))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class EventFileReader:
    """Reads one TensorBoard event file incrementally: each `read()` returns only the events
    appended since the last call. A record still being written is left for the next call."""

    def __init__(self, path: str | os.PathLike, tags: Iterable | None = None, check_data_crc: bool = False,
                 chunk: int = 8 << 20):
        self.path = Path(path)
        self.offset = 0
        self.tags = frozenset(tags) if tags is not None else None
        self.check_data_crc = check_data_crc
        self.chunk = chunk
        self.corrupt = ""  # set when a damaged record stops reading

    def read(self) -> list[tuple[float, int, str, float]]:
        """New (wall_time, step, tag, value) scalars."""
        out: list[tuple[float, int, str, float]] = []
        if self.corrupt:
            return out
        try:
            size = self.path.stat().st_size
        except OSError:
            return out
        if size < self.offset:  # the file was replaced: start again
            self.offset = 0
        if size == self.offset:
            return out
        unpack_header, unpack_i = struct.Struct("<QI").unpack_from, struct.Struct("<I").unpack_from
        decode_simple, decode_general = _decode_simple_at, _decode_general
        tags = self.tags
        names: dict[bytes, str | None] = {}  # a tag's bytes -> its text, None when not wanted
        good_headers: dict[int, int] = {}  # length -> its header's crc: records of one length share a header
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            pending = b""
            while True:
                block = f.read(self.chunk)
                if not block:
                    break
                buf = pending + block if pending else block
                pos, n = 0, len(buf)
                while pos + 12 <= n:
                    length, header_crc = unpack_header(buf, pos)
                    if good_headers.get(length) != header_crc:
                        if header_crc != masked_crc(buf[pos:pos + 8]):
                            self.corrupt = f"{self.path}: damaged record header at byte {self.offset + pos}; reading stopped there"
                            self.offset += pos
                            return out
                        good_headers[length] = header_crc
                    start = pos + 12
                    end = start + length + 4
                    if end > n:
                        break
                    if self.check_data_crc and unpack_i(buf, end - 4)[0] != masked_crc(buf[start:end - 4]):
                        self.corrupt = f"{self.path}: damaged record data at byte {self.offset + pos}; reading stopped there"
                        self.offset += pos
                        return out
                    fast = decode_simple(buf, start, end - 4)
                    if fast is not None:
                        wall, step, tag_start, tag_end, value = fast
                        raw = buf[tag_start:tag_end]
                        name = names.get(raw, raw)
                        if name is raw:  # first time this tag is seen
                            text = raw.decode("utf-8", "replace")
                            name = names[raw] = text if tags is None or text in tags else None
                        if name is not None:
                            out.append((wall, step, name, value))
                    else:
                        wall, step, values = decode_general(buf[start:end - 4], tags)
                        for tag, value in values:
                            out.append((wall, step, tag, value))
                    pos = end
                self.offset += pos
                pending = buf[pos:]
        return out


# ---- smoothing and the monitor state -------------------------------------------------------

def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's scalar smoothing: an exponential moving average with debiasing, so the start
    of the curve is not pulled towards zero. Non-finite values pass through unchanged."""
    out, last, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        n += 1
        out.append(last / (1 - weight ** n) if weight < 1 else v)
    return out


@dataclass
class Series:
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def add(self, step: int, value: float, wall: float) -> None:
        self.steps.append(step)
        self.values.append(value)
        self.times.append(wall)


@dataclass
class Sample:
    path: str
    step: int | None
    epoch: int | None
    index: int
    seed: int | None


@dataclass
class TrainingStatus:
    series: dict[str, Series] = field(default_factory=dict)  # tag -> series
    current: int | None = None
    total: int | None = None
    epoch: int | None = None
    epochs: int | None = None
    loss: float | None = None
    rate: float | None = None
    eta_s: float | None = None
    phase: str = ""
    finished: str = ""  # run_end status once the run is over
    samples: list[Sample] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def loss_series(self) -> Series:
        """Per-step loss: TensorBoard's loss/current, else the progress events' loss."""
        return self.series.get("loss/current") or self.series.get("progress/loss") or Series()

    def to_dict(self, smoothing: float = 0.6) -> dict[str, Any]:
        loss = self.loss_series()
        sm = smooth(loss.values, smoothing)
        return {
            "current": self.current, "total": self.total, "epoch": self.epoch, "epochs": self.epochs,
            "loss": self.loss, "smoothed_loss": sm[-1] if sm else None, "rate": self.rate, "eta_s": self.eta_s,
            "phase": self.phase, "finished": self.finished,
            "lr": self.series[LR_TAG].values[-1] if LR_TAG in self.series and self.series[LR_TAG].values else None,
            "points": {tag: len(s.values) for tag, s in self.series.items()},
            "samples": [s.__dict__ for s in self.samples], "outputs": self.outputs, "warnings": self.warnings,
        }

    def summary_line(self) -> str:
        parts = [self.phase] if self.phase else []
        if self.current is not None:
            parts.append(f"step {self.current}" + (f"/{self.total}" if self.total else ""))
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch}" + (f"/{self.epochs}" if self.epochs else ""))
        loss = self.loss_series()
        if loss.values:
            parts.append(f"loss {loss.values[-1]:.4f} (smoothed {smooth(loss.values)[-1]:.4f})")
        if LR_TAG in self.series and self.series[LR_TAG].values:
            parts.append(f"lr {self.series[LR_TAG].values[-1]:.3g}")
        if self.rate:
            parts.append(f"{self.rate:.2f} it/s")
        if self.eta_s is not None and not self.finished:
            parts.append(f"ETA {_duration(self.eta_s)}")
        if self.samples or self.epoch is not None or self.series:  # a training step's samples (none for others)
            parts.append(f"{len(self.samples)} samples")
        if self.finished:
            parts.append(f"run {self.finished}")
        return ", ".join(parts)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _logging_dir(argv: list[str]) -> str | None:
    from ..executors.resume import flag_value
    from ..pipelines.registry import option

    return flag_value(argv, option("logging_dir"))


# ---- runs and their steps ------------------------------------------------------------------

@dataclass
class StepInfo:
    id: str
    kind: str = ""
    status: str = ""  # "" while running; succeeded, failed, cancelled, skipped


def run_steps(run_dir: Path) -> tuple[list[StepInfo], str]:
    """The steps a run folder's events.jsonl names, in the order they started, and how the run ended ("" if running)."""
    steps: dict[str, StepInfo] = {}
    ended = ""
    path = run_dir / "events.jsonl"
    with open(path, "rb") as f:
        for raw in f:
            try:
                e = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if not isinstance(e, dict):
                continue
            kind, step, data = e.get("kind"), e.get("step") or "", e.get("data") or {}
            if kind == "step_start" and step:
                steps.setdefault(step, StepInfo(step)).kind = data.get("kind", "")
                steps[step].status = ""
            elif kind == "step_end" and step:
                steps.setdefault(step, StepInfo(step)).status = data.get("status", "ended")
            elif kind == "run_end":
                ended = data.get("status", "ended")
    return list(steps.values()), ended


def current_step(steps: list[StepInfo]) -> StepInfo | None:
    """The step to show: the one running, else the last training step, else the last one."""
    from ..pipelines.registry import TRAINING_KINDS

    running = [s for s in steps if not s.status]
    training = [s for s in steps if s.kind in TRAINING_KINDS]
    return (running or training or steps or [None])[-1]


def runs_of(workdir: Path) -> list[Path]:
    """A workdir's run folders (<workdir>/runs/<time>/), oldest first."""
    folder = workdir / "runs"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if (p / "events.jsonl").is_file()), key=lambda p: p.name)


def find_run(path: Path) -> Path:
    """What `monitor PATH` follows: a run folder, a TensorBoard log folder or file as given, or a
    workdir's newest run. Anything else is refused, saying what was expected."""
    if path.is_file() or (path / "events.jsonl").is_file():
        return path
    runs = runs_of(path)
    if runs:
        return runs[-1]
    if any(path.rglob("events.out.tfevents*")):
        return path
    raise FileNotFoundError(
        f"{path}: no run here. Expected a run folder (<workdir>/runs/<time>/ with events.jsonl), a workdir "
        "with runs/ (made by `musubi-pipe run`), or a TensorBoard log folder (events.out.tfevents.* files, "
        "musubi's --logging_dir)" + ("; runs/ holds no run with events.jsonl yet" if (path / "runs").is_dir() else ""))


def _duration(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class TrainingMonitor:
    """Follows a run folder (events.jsonl, TensorBoard logs below it, samples) or a TensorBoard
    log folder. `poll()` reads only what was appended since the previous poll."""

    def __init__(self, path: str | os.PathLike, sample_dirs: Iterable[str | os.PathLike] = (), step: str | None = None):
        self.root = Path(path)
        if not self.root.exists():
            raise FileNotFoundError(f"{self.root}: no such run folder or log folder (give the run folder or musubi's --logging_dir)")
        self.step = step  # only this step's events (a run may have several training steps)
        self.kind = ""  # the step's stage kind, once its step_start is read
        self.status = TrainingStatus()
        self._readers: dict[Path, EventFileReader] = {}
        self._jsonl_offset = 0
        self._sample_dirs = {Path(d) for d in sample_dirs}
        self._log_dirs: dict[Path, float] = {}  # the step's TensorBoard folder -> when the step started
        self._tags = frozenset((*LOSS_TAGS, LR_TAG))

    @property
    def training(self) -> bool:
        """Whether losses, learning rates and samples can belong to what is followed: not for
        one step of a run that is not a training step (a preview's inference steps are not epochs)."""
        from ..pipelines.registry import TRAINING_KINDS

        return not (self.step and self.kind) or self.kind in TRAINING_KINDS

    def _events_jsonl(self) -> Path | None:
        if self.root.is_file():
            return self.root if self.root.suffix == ".jsonl" else None
        p = self.root / "events.jsonl"
        return p if p.is_file() else None

    def poll(self) -> TrainingStatus:
        jsonl = self._events_jsonl()
        if jsonl is not None:
            self._read_jsonl(jsonl)
        for path in self._event_files() if self.training else ():
            reader = self._readers.get(path)
            if reader is None:
                reader = self._readers[path] = EventFileReader(path, self._tags)
            for wall, step, tag, value in reader.read():
                self.status.series.setdefault(tag, Series()).add(step, value, wall)
            if reader.corrupt and reader.corrupt not in self.status.warnings:
                self.status.warnings.append(reader.corrupt)
        self._update_eta()
        if self.training:
            self._find_samples()
        return self.status

    def _event_files(self) -> list[Path]:
        if self.root.is_file():
            return [self.root] if "tfevents" in self.root.name else []
        # sorted by name: musubi's log folders carry a timestamp, so older runs come first
        found = set(self.root.rglob("events.out.tfevents*"))
        for folder, started in self._log_dirs.items():  # the step's --logging_dir: this run's files only
            found.update(p for p in folder.rglob("events.out.tfevents*") if _mtime(p) >= started - 2)
        return sorted(found)

    def _read_jsonl(self, path: Path) -> None:
        with open(path, "rb") as f:
            f.seek(self._jsonl_offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self._jsonl_offset += end
        st = self.status
        for raw in data[:end].splitlines():
            try:
                e = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if not isinstance(e, dict) or (self.step and e.get("step") and e.get("step") != self.step):
                continue
            kind = e.get("kind")
            if kind == "progress":
                for key in ("current", "total", "epoch", "epochs", "loss", "rate", "eta_s", "phase"):
                    if e.get(key) is not None:
                        setattr(st, key, e[key])
                if e.get("loss") is not None and e.get("current") is not None and e.get("phase", "training") == "training":
                    st.series.setdefault("progress/loss", Series()).add(int(e["current"]), float(e["loss"]), float(e.get("time", 0)))
            elif kind == "output":
                p = (e.get("data") or {}).get("path")
                if p and p not in st.outputs:
                    st.outputs.append(p)
                    self._sample_dirs.add(Path(p).parent / "sample")
            elif kind == "step_start":
                data = e.get("data") or {}
                self.kind = data.get("kind") or self.kind
                out_dir = data.get("output_dir")
                if out_dir:  # musubi saves training samples in <output_dir>/sample
                    self._sample_dirs.add(Path(out_dir) / "sample")
                logs = _logging_dir(data.get("argv") or [])
                if self.step and logs:
                    self._log_dirs.setdefault(Path(logs), float(e.get("time") or 0))
            elif kind == "run_end":
                st.finished = (e.get("data") or {}).get("status", "ended")

    def _update_eta(self) -> None:
        st = self.status
        loss = st.series.get("loss/current")
        if loss and loss.steps:
            if st.current is None or loss.steps[-1] > st.current:
                st.current = loss.steps[-1]
            # rate over the last stretch of the log, unless events already gave one
            k = max(0, len(loss.times) - 50)
            dt = loss.times[-1] - loss.times[k]
            if dt > 0 and loss.steps[-1] > loss.steps[k] and not st.rate:
                st.rate = (loss.steps[-1] - loss.steps[k]) / dt
        if st.total and st.current is not None and st.rate and not st.finished:
            st.eta_s = max(0.0, (st.total - st.current) / st.rate)

    def _find_samples(self) -> None:
        dirs = set(self._sample_dirs)
        if self.root.is_dir() and (self.root / "sample").is_dir():
            dirs.add(self.root / "sample")
        seen = {s.path for s in self.status.samples}
        for d in dirs:
            if not d.is_dir():
                continue
            for p in sorted(d.iterdir()):
                m = SAMPLE_NAME.match(p.name)
                if m and str(p) not in seen:
                    n = int(m["n"])
                    self.status.samples.append(Sample(str(p), None if m["epoch"] else n, n if m["epoch"] else None,
                                                      int(m["index"]), int(m["seed"]) if m["seed"] else None))
        self.status.samples.sort(key=lambda s: (s.epoch or 0, s.step or 0, s.index))


# ---- chart ---------------------------------------------------------------------------------

def draw_chart(status: TrainingStatus, width: int = 800, height: int = 400, smoothing: float = 0.6):
    """A PIL chart: raw loss (light), smoothed loss (bold) on the left axis, learning rate on the
    right axis, step on the x axis, and a title line with progress and ETA."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 62, 62, 28, 34
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    d.text((8, 6), status.summary_line()[: width // 6], fill=(0, 0, 0), font=font)
    d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    loss = status.loss_series()
    lr = status.series.get(LR_TAG) or Series()
    if not loss.values and not lr.values:
        d.text((x0 + 10, (y0 + y1) // 2), "no loss or learning-rate data yet", fill=(90, 90, 90), font=font)
        return img
    all_steps = loss.steps + lr.steps
    smin, smax = min(all_steps), max(all_steps)
    if smax == smin:
        smax = smin + 1

    def sx(s):
        return x0 + (s - smin) / (smax - smin) * (x1 - x0)

    def line_points(steps, values, sy):
        return _thin([(sx(s), sy(v)) for s, v in zip(steps, values) if math.isfinite(v)], x1 - x0)

    def y_axis(values, tick_x: float, label_x: float, fmt: str, colour, name: str):
        """The value -> y scale for `values`, after drawing its five ticks, their values and its name."""
        lo, hi = _value_range(values)

        def sy(v):
            return y1 - (v - lo) / (hi - lo) * (y1 - y0)

        for k in range(5):
            v = lo + (hi - lo) * k / 4
            d.line([tick_x, sy(v), tick_x + 4, sy(v)], fill=(120, 120, 120))
            d.text((label_x, sy(v) - 6), format(v, fmt), fill=colour, font=font)
        d.text((label_x, y0 - 14), name, fill=colour, font=font)
        return sy

    # x ticks
    for k in range(6):
        s = smin + (smax - smin) * k / 5
        x = sx(s)
        d.line([x, y1, x, y1 + 4], fill=(120, 120, 120))
        d.text((x - 12, y1 + 6), f"{int(round(s))}", fill=(60, 60, 60), font=font)
    d.text(((x0 + x1) // 2 - 12, height - 14), "step", fill=(60, 60, 60), font=font)
    if loss.values:
        sy = y_axis(loss.values, x0 - 4, 4, ".4g", (30, 70, 160), "loss")
        pts = line_points(loss.steps, loss.values, sy)
        if len(pts) > 1:
            d.line(pts, fill=(170, 195, 235), width=1)
        pts = line_points(loss.steps, smooth(loss.values, smoothing), sy)
        if len(pts) > 1:
            d.line(pts, fill=(30, 70, 160), width=2)
        elif pts:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=(30, 70, 160))
    if lr.values:
        sy = y_axis(lr.values, x1, x1 + 6, ".2g", (200, 90, 20), "lr")
        pts = line_points(lr.steps, lr.values, sy)
        if len(pts) > 1:
            d.line(pts, fill=(200, 90, 20), width=1)
    return img


def _value_range(values: list[float]) -> tuple[float, float]:
    """The finite values' range with 5% room above and below (a flat line gets room too)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    return lo - pad, hi + pad


def _thin(points: list[tuple[float, float]], pixels: float) -> list[tuple[float, float]]:
    """At most ~2 points per pixel column: drawing a million-point line is slow and looks the same."""
    limit = max(2, int(pixels) * 2)
    if len(points) <= limit:
        return points
    step = len(points) / limit
    return [points[int(i * step)] for i in range(limit)] + [points[-1]]
