"""What a document may cost to read. Pipelines and dataset configs are shared files: reading one
must take bounded time and memory whatever it holds, and every refusal is a message with the
file, the line and a fix, never a traceback."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from ..errors import PipelineError, Problem

# A pipeline is a few KiB; these bounds are far above any real document and far below what
# hurts a machine.
MAX_DOCUMENT_BYTES = 1 << 20  # pipeline files, dataset configs, prompt files
MAX_VALUES = 100_000  # values in one document, YAML aliases expanded
MAX_DEPTH = 32  # nesting of tables and lists (a pipeline needs about 6)
MAX_STRING = 65_536  # characters in one string, before and after {{ }} interpolation


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def read_document(path: str | Path, what: str = "pipeline", limit: int = MAX_DOCUMENT_BYTES) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes, or PipelineError. Devices,
    FIFOs and folders are refused before they are opened for reading (a FIFO would block,
    /dev/zero never ends)."""
    path = Path(path)
    file = str(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise PipelineError([Problem("no such file", file=file, fix=f"check the {what} path")]) from None
    except OSError as exc:
        raise PipelineError([Problem(f"cannot read the file: {exc.strerror or exc}", file=file, fix=f"check the {what} path and its permissions")]) from None
    _check_regular(info, file, what, limit)
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO since the stat, opening it does not wait.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise PipelineError([Problem(f"cannot read the file: {exc.strerror or exc}", file=file, fix=f"check the {what} path and its permissions")]) from None
    with os.fdopen(fd, "rb") as f:
        _check_regular(os.fstat(f.fileno()), file, what, limit)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise PipelineError([Problem(f"the file is larger than {_mib(limit)}, the most a {what} may be", file=file, fix=f"check that this is the {what} you meant")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PipelineError([Problem(f"the file is not UTF-8 text (byte {exc.start})", file=file, line=line, fix="save it as UTF-8 text")]) from None


def _check_regular(info: os.stat_result, file: str, what: str, limit: int) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise PipelineError([Problem("this is a folder, not a file", file=file, fix=f"give the path of the {what} file inside it")])
    if not stat.S_ISREG(info.st_mode):
        raise PipelineError([Problem("this is not a regular file (a device, FIFO or socket)", file=file, fix=f"give the path of a {what} file")])
    if info.st_size > limit:
        raise PipelineError([Problem(f"the file is {_mib(info.st_size)}; a {what} may be at most {_mib(limit)}", file=file, fix=f"check that this is the {what} you meant")])


def check_shape(data: Any, source) -> None:
    """Refuse a parsed document that nests too deeply, holds too many values or too long a
    string, before anything walks it recursively. Stops at the first excess, so a document
    whose YAML aliases expand to billions of values costs at most MAX_VALUES steps."""
    count = 0
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise PipelineError([source.problem(path, f"the document holds more than {MAX_VALUES} values",
                                                "a pipeline needs far fewer: remove generated or repeated data (YAML aliases count once per use)")])
        if len(path) > MAX_DEPTH:
            raise PipelineError([source.problem(path[:MAX_DEPTH], f"values are nested more than {MAX_DEPTH} levels deep",
                                                "a pipeline needs a few levels: check the brackets or indentation here")])
        if isinstance(value, str):
            if len(value) > MAX_STRING:
                raise PipelineError([source.problem(path, f"a string of {len(value)} characters (at most {MAX_STRING})",
                                                    "shorten it; long prompt lists belong in a prompt file")])
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and len(key) > 200:
                    raise PipelineError([source.problem(path, f"a key of {len(key)} characters", "use a short name")])
                stack.append((item, path + (key,)))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, path + (i,)) for i, item in enumerate(value))


def deep_line(text: str, limit: int = MAX_DEPTH) -> int | None:
    """The line where brackets in TOML/JSON text first nest deeper than `limit` (strings and
    comments skipped roughly); used only to place a 'nested too deeply' message."""
    depth, line, quote = 0, 1, ""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
        elif quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        elif c in "[{":
            depth += 1
            if depth > limit:
                return line
        elif c in "]}":
            depth -= 1
        i += 1
    return None


def too_deep(file: str, text: str) -> PipelineError:
    return PipelineError([Problem(f"values are nested more than {MAX_DEPTH} levels deep", file=file, line=deep_line(text),
                                  fix="a pipeline needs a few levels: check the brackets here")])


# --- YAML ----------------------------------------------------------------------------------

class YamlRefused(Exception):
    """A YAML document refused while it was being composed, at a line."""

    def __init__(self, message: str, line: int, fix: str):
        super().__init__(message)
        self.message, self.line, self.fix = message, line, fix


def compose_yaml(text: str):
    """The YAML node graph of `text` (PyYAML's safe loader), refusing duplicate keys, aliases
    that contain themselves or expand to more than MAX_VALUES values, and deep nesting."""
    loader = _BoundedLoader(text)
    try:
        return loader, loader.get_single_node()
    except BaseException:
        loader.dispose()
        raise


def _bounded_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self._depth = 0
            self._sizes: dict[int, int] = {}  # id(node) -> values it stands for, aliases expanded
            self._open: set[str] = set()  # anchors whose node is being composed

        def compose_node(self, parent, index):
            event = self.peek_event()
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent) and event.anchor in self._open:
                raise YamlRefused(f"the alias *{event.anchor} is inside the value it names", line,
                                  "a value cannot contain itself: copy what you need instead")
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise YamlRefused(f"values are nested more than {MAX_DEPTH} levels deep", line,
                                  "a pipeline needs a few levels: check the indentation or brackets here")
            anchor = getattr(event, "anchor", None) if not isinstance(event, yaml.AliasEvent) else None
            if anchor:
                self._open.add(anchor)
            try:
                node = super().compose_node(parent, index)
            finally:
                self._depth -= 1
                self._open.discard(anchor)
            key = id(node)
            if key not in self._sizes:
                if isinstance(node, yaml.MappingNode):
                    children = [n for pair in node.value for n in pair]
                elif isinstance(node, yaml.SequenceNode):
                    children = node.value
                else:
                    children = []
                size = 1 + sum(self._sizes.get(id(c), 1) for c in children)
                if size > MAX_VALUES:
                    raise YamlRefused(f"this value expands to more than {MAX_VALUES} values (through YAML aliases)", line,
                                      "use fewer aliases (*name) of large values")
                self._sizes[key] = size
            return node

        def compose_mapping_node(self, anchor):
            node = super().compose_mapping_node(anchor)
            seen: dict[Any, int] = {}
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    if key.value in seen:
                        raise YamlRefused(f"duplicate key {key.value!r} (first on line {seen[key.value]}); YAML would keep only the last one",
                                          line, "rename or remove one of them")
                    seen[key.value] = line
            return node

    return Loader


_LOADER = None


def _BoundedLoader(text: str):  # noqa: N802 - a class made on first use, so yaml is imported only for YAML
    global _LOADER
    if _LOADER is None:
        _LOADER = _bounded_loader()
    return _LOADER(text)
