"""Turns musubi-tuner's stdout/stderr, as it arrives, into progress, output and log events."""
from __future__ import annotations

import math
import re

from . import events as ev
from ..pipelines.registry import TRAINING_KINDS

# tqdm's non-tty meter: "[desc: ]NN%|bar| n/total [elapsed<remaining, rate[, postfix]]" or,
# with no total, "[desc: ]n it [elapsed, rate[, postfix]]". Numbers may carry unit prefixes (4.50G).
_NUM = r"[\d.]+[kMGTP]?"
_BAR = re.compile(
    r"^(?:(?P<desc>.*?): ?)?"
    r"(?:\s*(?P<pct>\d+)%\|[^|]*\| ?(?P<n>" + _NUM + r")/(?P<total>" + _NUM + r")"
    r"|(?P<n2>" + _NUM + r")(?P<unit>[a-zA-Z]*))"
    r" \[(?P<elapsed>[\d:]+)(?:<(?P<remaining>[\d:?]+))?, *(?P<rate>[^,\]]*?)(?:, (?P<postfix>[^\]]*))?\]\s*$"
)
_RATE = re.compile(r"^(?P<v>[\d.]+)(?P<prefix>[kMGTP]?)(?P<unit>[a-zA-Z]*)/(?P<per>[a-zA-Z]+)$")
_LOSS = re.compile(r"(?:avr_loss|loss)=(?P<v>[-+\d.eE]+|nan|inf)")
_EPOCH = re.compile(r"^epoch (?P<n>\d+)/(?P<m>\d+)\s*$")
_SAVING = re.compile(r"^saving checkpoint: (?P<path>.+?)\s*$")
_SAVED_FILE = re.compile(r"(?:Video|Latent|Image|Sample images?) saved to: (?P<path>.+?)\s*$")
_BATCHES = re.compile(r"num batches per epoch / 1epochのバッチ数: (?P<v>\d+)")
_EPOCHS = re.compile(r"num epochs / epoch数: (?P<v>\d+)")
_ACCUM = re.compile(r"gradient accumulation steps / 勾配を合計するステップ数 = (?P<v>\d+)")
_TOTAL = re.compile(r"total optimization steps / 学習ステップ数: (?P<v>\d+)")
_SEP = re.compile(r"\r\n|\r|\n")
_GLUED = re.compile(r"\](?=(?:INFO|WARNING|ERROR|CRITICAL|DEBUG):|Traceback \(most recent call last\):)")
_SCALE = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}

# substrings of log lines that say a new phase has begun (checked in this order)
_PHASE_LINES = [
    ("generating sample images", "sampling"),
    ("Saving merged model", "saving"),
    ("Saving merged weights", "saving"),
    ("saving to ", "saving"),
    ("Encoding dataset", "caching"),
    ("running training / 学習開始", "training"),
    ("Loading DiT", "loading"),
    ("Loading VAE", "loading"),
    ("Loading text encoder", "loading"),
    ("Loading weights from", "loading"),
    ("loading ", "loading"),
    ("Load dataset config", "loading"),
    ("converting to", "converting"),
    ("Merging completed successfully", "done"),
    ("model saved.", "done"),
    ("Merged model saved", "done"),
]
# the phase a bar with no description means, per step kind
_BAR_PHASE = {"cache_latents": "caching", "cache_text_encoder": "caching", "generate": "generating",
              "train": "training", "finetune": "training", "merge": "converting", "convert": "converting", "ema": "converting"}


def _number(text: str) -> float:
    return float(text[:-1]) * _SCALE[text[-1]] if text and text[-1] in _SCALE else float(text)


def _seconds(text: str | None) -> float | None:
    if not text or "?" in text:
        return None
    total = 0
    for part in text.split(":"):
        total = total * 60 + int(part)
    return float(total)


def _rate(text: str) -> float | None:
    """Iterations per second from tqdm's '1.23it/s' or '1.20s/it' (None for '?it/s')."""
    m = _RATE.match(text.strip())
    if not m:
        return None
    value = float(m["v"]) * _SCALE[m["prefix"]]
    if m["unit"] == "s" and m["per"] != "s":  # "1.20s/it"
        return 1.0 / value if value else None
    return value


class ProgressParser:
    """Feed it a step's output chunks; it returns events. One parser per step attempt.

    Chunks may end anywhere: text after the last line break waits in a per-stream buffer. Both
    `\\r` (tqdm redraws) and `\\n` end a segment; only `\\n`-ended segments become LOG events.
    A tqdm bar still waiting for its terminator is read at once, so progress is not one redraw
    late; re-reading it when it completes changes nothing, so how the stream was cut into chunks
    never changes the events.
    """

    def __init__(self, step_id: str, kind: str):
        self.step, self.kind = step_id, kind
        self._buf: dict[str, str] = {}
        self.phase = "starting"
        self.epoch = self.epochs = None
        self.train = {"current": None, "total": None, "loss": None, "rate": None, "eta_s": None}
        self.bar = dict(self.train)  # the latest bar of a phase other than training
        self.bar_what = ""
        self._batches = self._accum = None
        self._last_key = None
        self._last_bar = ""

    # ---------------------------------------------------------------- input

    def feed(self, stream: str, chunk: str) -> list[ev.Event]:
        found: list[ev.Event] = []
        text = self._buf.get(stream, "") + chunk
        # a final "\r" could be half of a Windows "\r\n": decide when more arrives
        end = len(text) - 1 if text.endswith("\r") else len(text)
        start = 0
        for m in _SEP.finditer(text, 0, end):
            self._segment(stream, text[start:m.start()], m.group() != "\r", found)
            start = m.end()
        rest = text[start:]
        self._buf[stream] = rest
        tail = rest[:-1] if rest.endswith("\r") else rest
        if tail.endswith("]"):
            self._bar(tail, found)
        return found

    def flush(self) -> list[ev.Event]:
        """End of output: whatever is left in the buffers counts as complete lines."""
        found: list[ev.Event] = []
        for stream in list(self._buf):
            rest = self._buf.pop(stream).rstrip("\r")
            if rest:
                self._segment(stream, rest, True, found)
        return found

    # ---------------------------------------------------------------- parsing

    def _segment(self, stream: str, segment: str, is_line: bool, found: list[ev.Event]) -> None:
        if not segment.strip():
            return
        m = _GLUED.search(segment)
        if m:  # a log line written right after a bar redraw, with no line break between them
            self._segment(stream, segment[:m.start() + 1], False, found)
            segment = segment[m.start() + 1:]
        # the LOG event comes after what the line means, so a bar read early (see feed) keeps its place
        if not (segment.endswith("]") and "[" in segment and self._bar(segment, found)):
            self._line(segment.strip(), found)
        if is_line:
            found.append(ev.Event(ev.LOG, step=self.step, data={"stream": stream, "text": segment}))

    def _bar(self, segment: str, found: list[ev.Event]) -> bool:
        if segment == self._last_bar:
            return True  # the same redraw read again (early as a tail, then complete)
        m = _BAR.match(segment)
        if not m:
            return False
        self._last_bar = segment
        desc = (m["desc"] or "").strip()
        if m["n"] is not None:
            current, total = int(_number(m["n"])), int(_number(m["total"]))
        else:
            current, total = int(_number(m["n2"])), None
        rate = _rate(m["rate"])
        eta = _seconds(m["remaining"])
        if eta is None and total is not None and rate:
            eta = max(0.0, (total - current) / rate)
        loss = None
        if m["postfix"]:
            lm = _LOSS.search(m["postfix"])
            if lm:
                loss = float(lm["v"])
        values = {"current": current, "total": total, "loss": loss, "rate": rate, "eta_s": eta}
        if desc == "steps" or (not desc and self.kind in TRAINING_KINDS and self.phase == "training"):
            self.phase = "training"
            self.train = values
        else:
            if desc.startswith("Loading") or desc.endswith((".safetensors", ".pth", ".bin", ".gguf")):
                phase = "loading"
            elif self.phase in ("sampling", "loading", "caching", "generating", "converting") and not desc:
                phase = self.phase if self.phase != "loading" else _BAR_PHASE.get(self.kind, "loading")
            else:
                phase = _BAR_PHASE.get(self.kind, self.phase)
            self.phase = phase
            self.bar, self.bar_what = values, desc
        self._progress(found)
        return True

    def _line(self, line: str, found: list[ev.Event]) -> None:
        m = _EPOCH.match(line)
        if m:
            self.epoch, self.epochs = int(m["n"]), int(m["m"])
            self.phase = "training"
            self._progress(found)
            return
        m = _SAVING.match(line)
        if m:
            self.phase = "saving"
            found.append(ev.Event(ev.OUTPUT, step=self.step, data={"name": "checkpoint", "path": m["path"]}))
            self._progress(found)
            return
        m = _SAVED_FILE.search(line)
        if m:
            self.phase = "saving"
            found.append(ev.Event(ev.OUTPUT, step=self.step, data={"name": "file", "path": m["path"]}))
            self._progress(found)
            return
        # a cheap filter for the lines of the 'running training' block (one word of each) before its regexes
        if "/" in line and ("学習" in line or "epoch数" in line or "1epoch" in line or "勾配" in line):
            self._training_block(line, found)
            return
        for needle, phase in _PHASE_LINES:
            if needle in line:
                if phase == "loading" and self.phase in ("training", "sampling"):
                    return  # loading messages while training (resume, samples) do not end training
                if phase != self.phase:
                    self.phase = phase
                    if phase not in ("training", "done", "saving"):
                        self.bar, self.bar_what = dict.fromkeys(self.bar), ""
                    self._progress(found)
                return

    def _training_block(self, line: str, found: list[ev.Event]) -> None:
        """The 'running training / 学習開始' block: batches per epoch, epochs, total steps."""
        for rx, what in ((_BATCHES, "batches"), (_ACCUM, "accum"), (_EPOCHS, "epochs"), (_TOTAL, "total")):
            m = rx.search(line)
            if not m:
                continue
            value = int(m["v"])
            if what == "batches":
                self._batches = value
            elif what == "accum":
                self._accum = value
            elif what == "epochs":
                self.epochs = value
            else:
                self.phase = "training"
                self.train = {**self.train, "total": value, "current": self.train["current"] or 0}
                self._progress(found)
            return
        if "running training" in line:
            self.phase = "training"
            self._progress(found)

    # ---------------------------------------------------------------- output

    def _progress(self, found: list[ev.Event]) -> None:
        numbers = self.train if self.phase in ("training", "saving", "done") and self.kind in TRAINING_KINDS else self.bar
        data = {}
        if self.bar_what and numbers is self.bar:
            data["what"] = self.bar_what
        if self.kind in TRAINING_KINDS and self._batches:
            data["steps_per_epoch"] = math.ceil(self._batches / (self._accum or 1))
        key = (self.phase, numbers["current"], numbers["total"], self.epoch, self.epochs, numbers["loss"],
               tuple(sorted(data.items())))
        if key == self._last_key:
            return  # a redraw with nothing new
        self._last_key = key
        found.append(ev.Event(ev.PROGRESS, step=self.step, phase=self.phase, current=numbers["current"],
                              total=numbers["total"], epoch=self.epoch, epochs=self.epochs, loss=numbers["loss"],
                              rate=numbers["rate"], eta_s=numbers["eta_s"], data=data))
