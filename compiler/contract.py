"""musubi-tuner's command-line contract: the recorded argument parsers of its scripts
(pipelines/musubi_cli/<commit>/), used to spell flags and to check every argv we emit."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CONTRACT_ROOT = Path(__file__).resolve().parent.parent / "pipelines" / "musubi_cli"
CONTRACT = sorted(p.name for p in CONTRACT_ROOT.iterdir() if p.is_dir())[-1]


@dataclass(frozen=True)
class Option:
    flag: str  # the full flag, such as "--network_dim"
    dest: str
    action: str  # store, store_true, store_false, append, count, positional
    nargs: object
    type: str | None
    choices: tuple | None
    required: bool


class ContractError(Exception):
    pass


@lru_cache(maxsize=None)
def options(script: str) -> dict[str, Option]:
    """The script's options by dest name."""
    path = CONTRACT_ROOT / CONTRACT / (script.removesuffix(".py") + ".json")
    if not path.exists():
        raise ContractError(f"musubi-tuner {CONTRACT} has no script {script}")
    spec = json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for a in spec["args"]:
        action = {"_StoreTrueAction": "store_true", "_StoreFalseAction": "store_false", "_AppendAction": "append", "_CountAction": "count"}.get(a["action"], "store")
        positional = not a["flags"][0].startswith("-")
        # The long spelling: musubi sometimes lists a short alias first.
        flag = max(a["flags"], key=len) if not positional else a["flags"][0]
        out[a["dest"]] = Option(flag, a["dest"], "positional" if positional else action, a["nargs"], a["type"], tuple(a["choices"]) if a["choices"] else None, a["required"])
    return out


def render(script: str, dest: str, value) -> list[str]:
    """argv words for one option value, spelled in full (musubi accepts prefixes; we never emit them)."""
    opt = options(script)[dest]
    if opt.action in ("store_true", "store_false"):
        wanted = opt.action == "store_true"
        return [opt.flag] if bool(value) == wanted else []
    values = value if isinstance(value, (list, tuple)) else [value]
    words = [_word(v) for v in values]
    if opt.action == "positional":
        return words
    if opt.action == "append":
        return [w for v in words for w in (_joined(opt.flag, v) if v.startswith("-") else (opt.flag, v))]
    if len(words) == 1 and words[0].startswith("-") and not is_number(words[0]):
        return _joined(opt.flag, words[0])
    return [opt.flag, *words]


def _joined(flag: str, value: str) -> list[str]:
    # argparse reads a separate word starting with '-' as an option ("- a dancer" as a prompt),
    # but takes --flag=value as the value whatever it starts with.
    return [f"{flag}={value}"]


def is_number(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


def _word(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if value != int(value) or abs(value) >= 1e16 else f"{value:.1f}"
    return str(value)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ContractError(message)


@lru_cache(maxsize=None)
def parser(script: str) -> argparse.ArgumentParser:
    """The script's parser rebuilt from the record, abbreviations disallowed."""
    p = _Parser(prog=script, allow_abbrev=False, add_help=False)
    for opt in options(script).values():
        kw: dict = {}
        if opt.action == "positional":
            if opt.nargs is not None:
                kw["nargs"] = opt.nargs
            p.add_argument(opt.dest, **kw)
            continue
        kw["dest"] = opt.dest
        if opt.action in ("store_true", "store_false", "count"):
            kw["action"] = opt.action
        else:
            if opt.action == "append":
                kw["action"] = "append"
            if opt.nargs is not None:
                kw["nargs"] = opt.nargs
            if opt.choices:
                kw["choices"] = opt.choices
            if opt.type in ("int", "float"):
                kw["type"] = {"int": int, "float": float}[opt.type]
        if opt.required:
            kw["required"] = True
        flags = [f for f in _all_flags(script, opt.dest)]
        p.add_argument(*flags, **kw)
    return p


@lru_cache(maxsize=None)
def _flags_by_dest(script: str) -> dict[str, list[str]]:
    spec = json.loads((CONTRACT_ROOT / CONTRACT / (script.removesuffix(".py") + ".json")).read_text(encoding="utf-8"))
    return {a["dest"]: a["flags"] for a in spec["args"]}


def _all_flags(script: str, dest: str) -> list[str]:
    return _flags_by_dest(script)[dest]


def check(script: str, args: list[str]) -> str | None:
    """None if musubi's parser accepts the argv, else argparse's message."""
    try:
        parser(script).parse_args(args)
    except ContractError as exc:
        return str(exc)
    return None


def set_option(script: str, args: list[str], dest: str, value) -> list[str]:
    """The argv with one option replaced (or added, or removed for a switch turned off): every
    earlier spelling of it, with its values, goes; the new value is rendered as `render` does."""
    opt = options(script)[dest]
    takes = 0 if opt.action in ("store_true", "store_false", "count") else None if opt.nargs in ("*", "+") else (
        opt.nargs if isinstance(opt.nargs, int) else 1)
    out: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word == opt.flag or word.startswith(opt.flag + "="):
            i += 1
            if word == opt.flag:
                if takes is None:  # a list: its words up to the next option
                    while i < len(args) and not (args[i].startswith("--") and not is_number(args[i])):
                        i += 1
                else:
                    i += takes
            continue
        out.append(word)
        i += 1
    return out + render(script, dest, value)
