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


# The recorded parsers' value types, as argparse converts them.
_CONVERT = {"int": int, "float": float}


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

    def _get_formatter(self):
        # argparse makes a formatter for every add_argument (to check nargs), and each asks the
        # terminal for its width; a fixed width makes building a parser several times cheaper.
        return self.formatter_class(prog=self.prog, width=100)


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
                kw["type"] = _CONVERT[opt.type]
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
    if _plainly_accepted(script, args):
        return None
    try:
        parser(script).parse_args(args)
    except ContractError as exc:
        return str(exc)
    return None


# The argv the compiler writes is plain: full flags, each followed by its values. For such argv the
# answer is clear without argparse, which costs ~40 function calls a word (most of a compile once
# the imports are done). Anything else, and every refusal with its message, is argparse's.


@lru_cache(maxsize=None)
def _plain_rules(script: str):
    """(option string -> Option, required dests, positional or None), or None where argparse's
    placement of positionals is not simple: more than one, or one that may be empty."""
    opts = options(script).values()
    positionals = [o for o in opts if o.action == "positional"]
    if len(positionals) > 1 or (positionals and positionals[0].nargs not in ("+", "?")):
        return None
    flags = {f: o for o in opts if o.action != "positional" for f in _all_flags(script, o.dest)}
    return flags, {o.dest for o in opts if o.required}, positionals[0] if positionals else None


def _plainly_accepted(script: str, args: list[str]) -> bool:
    """True only where argparse surely accepts: a run of words for a '+' positional first (if the
    script has one; at most one word for a '?' one), then known full option strings (or --flag=value for a one-value option), each
    followed by exactly as many values as its nargs takes; no value starts with '-'; every value
    converts to the option's type and is among its choices; every required option is there."""
    rules = _plain_rules(script)
    if rules is None:
        return False
    flags, required, positional = rules
    seen: set[str] = set()
    i, n = 0, len(args)
    if positional is not None:
        while i < n and not args[i].startswith("-"):
            i += 1
        if positional.nargs == "?":  # one optional word first (Krea 2's prompt), or none
            if i > 1:
                return False
            if i == 1:
                seen.add(positional.dest)
        elif i == 0:  # parser() gives a positional no type or choices: any words do
            return False
        else:
            seen.add(positional.dest)
    while i < n:
        opt = flags.get(args[i])
        if opt is None:  # --flag=value
            flag, eq, value = args[i].partition("=")
            opt = flags.get(flag) if eq else None
            if opt is None or opt.nargs is not None or opt.action not in ("store", "append"):
                return False
            values, i = [value], i + 1
        else:
            start = i = i + 1
            while i < n and not args[i].startswith("-"):
                i += 1
            values = args[start:i]
            if not _count_fits(opt, len(values)):
                return False
        if not _values_fit(opt, values):
            return False
        seen.add(opt.dest)
    return required <= seen


def _count_fits(opt: Option, count: int) -> bool:
    if opt.action in ("store_true", "store_false"):
        return count == 0
    if opt.action not in ("store", "append"):
        return False
    nargs = opt.nargs
    if nargs is None:
        return count == 1
    if isinstance(nargs, int):
        return count == nargs
    return {"?": count <= 1, "*": True, "+": count >= 1}.get(nargs, False)


def _values_fit(opt: Option, values: list[str]) -> bool:
    convert = _CONVERT.get(opt.type)
    for word in values:
        try:
            value = convert(word) if convert else word
        except ValueError:
            return False
        if opt.choices is not None and value not in opt.choices:
            return False
    return True


def values_of(script: str, args: list[str], dests) -> dict:
    """The values `dests` have in an argv as musubi's parser reads them (None / False when unset),
    by a scan of the argv for their flags: cheaper than a whole parse for a few options."""
    found = {}
    for dest in dests:
        opt = options(script)[dest]
        value = False if opt.action in ("store_true", "store_false") else None
        for i, word in enumerate(args):
            flag, eq, text = word.partition("=")
            if flag != opt.flag:
                continue
            if opt.action in ("store_true", "store_false"):
                value = opt.action == "store_true"
            else:
                text = text if eq else (args[i + 1] if i + 1 < len(args) else "")
                value = _CONVERT.get(opt.type, str)(text)
        found[dest] = value
    return found


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
