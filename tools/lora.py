"""LoRA files without torch: read and write safetensors, detect key layout and architecture,
check key coverage against a family's modules, and merge several LoRAs into one."""
from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import PipelineError, Problem
from ..files import atomic_path

# Key layouts, in the user's words. musubi's convert_lora.py calls them "default" and "other".
MUSUBI = "musubi"  # lora_unet_<module_with_underscores>.lora_down.weight / .lora_up.weight / .alpha
COMFYUI = "comfyui"  # diffusion_model.<module.with.dots>.lora_A.weight / .lora_B.weight (+ .alpha)
CONVERT_TARGET = {MUSUBI: "default", COMFYUI: "other"}  # value of convert_lora.py --target

MUSUBI_PREFIX = "lora_unet_"
COMFY_PREFIXES = ("diffusion_model.", "transformer.")

# Tensor names inside one module, and what they are in musubi's naming.
_PARAM_NAMES = {
    "lora_down.weight": "lora_down.weight",
    "lora_up.weight": "lora_up.weight",
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    **{n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{n: n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
}
_PARAM_RE = re.compile(r"^(.*)\.(" + "|".join(re.escape(p) for p in sorted(_PARAM_NAMES, key=len, reverse=True)) + r")$")

_DTYPES = {  # safetensors dtype -> (numpy dtype name, bytes per element)
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("uint16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1), "F8_E4M3": ("uint8", 1), "F8_E5M2": ("uint8", 1),
}
_MAX_HEADER = 100 * 1024 * 1024


def _problem(file: Path | str, message: str, fix: str = "", severity: str = "error", path: str = "") -> Problem:
    return Problem(message=message, file=str(file), fix=fix, severity=severity, path=path)


def _fail(file: Path | str, message: str, fix: str = "") -> PipelineError:
    return PipelineError([_problem(file, message, fix)])


def _refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise _fail(path, "the output file already exists", "choose another name or pass --force to overwrite it")


def _no_lora_tensors(path: Path | str) -> PipelineError:
    return _fail(path, "no LoRA tensors found: expected lora_unet_*.lora_down/lora_up/alpha (musubi) or "
                 "diffusion_model.*.lora_A/lora_B (ComfyUI) names", "check that this file is a LoRA")


# ---------------------------------------------------------------------------------------------
# safetensors reading and writing (bf16 by hand: numpy has no bfloat16)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name: F32, BF16, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class SafetensorsFile:
    """The header of a safetensors file, checked against the file's size; tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise _fail(self.path, f"not a safetensors file: only {size} bytes",
                                "check the path; the file may be empty or a failed download")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or n + 8 > size:
                    raise _fail(self.path, f"not a safetensors file, or truncated: header length {n} does not fit in "
                                f"{size} bytes", "re-download or re-save the file")
                raw = f.read(n)
        except OSError as e:
            raise _fail(path, f"cannot read the file: {e.strerror or e}", "check that the path exists and is readable")
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise _fail(self.path, f"not a safetensors file: its header is not JSON ({e})",
                        "give a .safetensors LoRA; .ckpt/.pt files must be converted first")
        self.metadata: dict[str, str] = {k: str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        self.tensors: dict[str, TensorInfo] = {}
        base = 8 + n
        for name, entry in header.items():
            try:
                dtype, shape, (b, e) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise _fail(self.path, f"not a valid safetensors file: bad header entry for tensor {name!r}")
            if dtype not in _DTYPES:
                raise _fail(self.path, f"tensor {name!r} has dtype {dtype}, which musubi-pipe cannot read")
            if e - b != math.prod(shape) * _DTYPES[dtype][1]:
                raise _fail(self.path, f"not a valid safetensors file: tensor {name!r} has {e - b} bytes for shape {list(shape)}")
            if base + e > size:
                raise _fail(self.path, f"truncated: tensor {name!r} ends at byte {base + e} but the file has only {size} "
                            "bytes", "the save or download was cut off; re-download or re-save the file")
            self.tensors[name] = TensorInfo(name, dtype, shape, base + b, base + e)

    def raw(self, name: str):
        """The tensor as stored (bf16 and fp8 as unsigned integers), memory-mapped."""
        import numpy as np

        t = self.tensors[name]
        if t.end == t.start:
            return np.zeros(t.shape, dtype=_DTYPES[t.dtype][0])
        return np.memmap(self.path, dtype=_DTYPES[t.dtype][0], mode="r", offset=t.start, shape=t.shape)

    def float32(self, name: str, copy: bool = True):
        """The tensor as a float32 array: a copy, or with copy=False the read-only memory map
        itself where the file holds float32."""
        import numpy as np

        t = self.tensors[name]
        a = self.raw(name)
        if t.dtype == "F32" and not copy:
            return a
        if t.dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        if t.dtype.startswith("F8"):
            raise _fail(self.path, f"tensor {name!r} is stored as {t.dtype}; musubi-pipe reads fp8 LoRAs' shapes only",
                        "save the LoRA in float32, float16 or bfloat16")
        return np.array(a, dtype=np.float32)


def float32_to_bf16_bits(a):
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (uint16), as torch does."""
    import numpy as np

    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(a)
    if nan.any():
        rounded = np.where(nan, (u >> 16) | 0x40, rounded)
    return rounded.astype(np.uint16)


_OUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _encode(array, dtype: str) -> memoryview:
    """The tensor's bytes as stored, without a copy where the array already is that."""
    import numpy as np

    if dtype == "F32":
        a = np.ascontiguousarray(array, dtype="<f4")
    elif dtype == "F16":
        a = np.ascontiguousarray(array, dtype="<f2")
    elif dtype == "BF16":
        a = float32_to_bf16_bits(array).astype("<u2", copy=False)
    else:
        raise ValueError(dtype)
    return memoryview(a.reshape(-1)).cast("B")


def write_safetensors(path: str | os.PathLike, entries: list[tuple[str, str, tuple[int, ...]]],
                      arrays: Iterable, metadata: dict[str, str] | None = None, force: bool = False) -> Path:
    """Write tensors given in the order of `entries` (name, dtype F32/F16/BF16, shape) from the
    iterable `arrays`, streaming, written atomically."""
    path = Path(path)
    _refuse_existing(path, force)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * _DTYPES[dtype][1]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        it = iter(arrays)
        for name, dtype, shape in entries:
            a = next(it)
            if tuple(a.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {a.shape} differs from the planned {shape}")
            f.write(_encode(a, dtype))
    return path


# ---------------------------------------------------------------------------------------------
# Families: which modules musubi's LoRA networks train (tools/data/lora_targets.json)


@dataclass(frozen=True)
class TargetModule:
    module: str  # dotted name in the DiT: blocks.0.self_attn.q
    in_features: int
    out_features: int

    @property
    def lora_name(self) -> str:
        return lora_name_of(self.module)


def lora_name_of(module: str) -> str:
    return MUSUBI_PREFIX + module.replace(".", "_")


def _lora(family: str) -> dict:
    """The registry's [lora] facts of a family: network module, module sets, variants."""
    from ..pipelines import registry

    return registry.family(family).lora


def family_names() -> list[str]:
    from ..pipelines import registry

    return list(registry.family_names())


def resolve_family(name: str) -> str:
    """The canonical family name for a user's spelling (wan, hv, hunyuan-video, fpack, ...)."""
    from ..pipelines import registry

    found = registry.canonical(name)
    if found is None:
        raise PipelineError([Problem(f"unknown model family {name!r}", path="family",
                                     fix=f"use one of: {', '.join(family_names())}")])
    return found


def variants(family: str) -> list[str]:
    return list(_lora(resolve_family(family))["variants"])


@lru_cache(maxsize=None)
def target_modules(family: str, variant: str | None = None) -> dict[str, TargetModule]:
    """LoRA name -> module, for one family variant (default: the family's default variant)."""
    family = resolve_family(family)
    spec = _lora(family)
    variant = variant or spec["default_variant"]
    if variant not in spec["variants"]:
        raise PipelineError([Problem(f"{family} has no variant {variant!r}", path="variant",
                                     fix=f"use one of: {', '.join(spec['variants'])}")])
    v = spec["variants"][variant]
    while "same_as" in v:
        v = spec["variants"][v["same_as"]]
    dims = v["dims"]
    out: dict[str, TargetModule] = {}
    for prefix, count, set_name in v["groups"]:
        for i in range(count):
            for sub, (din, dout) in spec["module_sets"][set_name].items():
                m = TargetModule(f"{prefix}.{i}.{sub}", dims[din], dims[dout])
                out[m.lora_name] = m
    return out


@lru_cache(maxsize=None)
def _all_module_names() -> dict[str, str]:
    """LoRA name -> dotted module name over every family and variant (to undo '_' for '.')."""
    names: dict[str, str] = {}
    for fam in family_names():
        for var in _lora(fam)["variants"]:
            for ln, m in target_modules(fam, var).items():
                names[ln] = m.module
    return names


def family_of_modelspec(arch: str) -> str | None:
    """'wan2.1/lora' -> its family; None for an architecture that is not a family here."""
    from ..pipelines import registry

    return registry.family_of_modelspec(arch)


# ---------------------------------------------------------------------------------------------
# Reading a LoRA: modules, ranks, alphas, problems


@dataclass
class LoraModule:
    lora_name: str  # musubi's name: lora_unet_blocks_0_self_attn_q
    module: str  # dotted name where known: blocks.0.self_attn.q ("" if not resolvable)
    kind: str  # lora, loha, lokr, unknown
    tensors: dict[str, str]  # musubi param name (lora_down.weight, alpha, ...) -> tensor name in the file
    rank: int | None = None
    alpha: float | None = None
    in_features: int | None = None
    out_features: int | None = None

    @property
    def scale(self) -> float:
        """alpha / rank, as musubi and ComfyUI apply it (no alpha: alpha = rank)."""
        if not self.rank:
            return 1.0
        return (self.alpha if self.alpha not in (None, 0) else self.rank) / self.rank


@dataclass
class Coverage:
    """How a LoRA's modules match the modules musubi trains for a family variant."""

    family: str
    variant: str
    matched: int
    expected: int
    unknown: list[str]  # in the file, not a target module: "lora key not loaded"
    missing: list[str]  # target modules the file does not train (often intended)
    wrong_shape: list[str]  # present but shaped for another model size
    misnamed: list[str] = field(default_factory=list)  # ComfyUI layout: dotted name differs from the model's

    def as_dict(self) -> dict:
        return {"family": self.family, "variant": self.variant, "matched": self.matched, "expected": self.expected,
                "unknown": self.unknown, "missing": self.missing, "wrong_shape": self.wrong_shape,
                "misnamed": self.misnamed}


@dataclass
class LoraReport:
    path: Path
    layout: str  # musubi, comfyui, mixed
    kind: str  # lora, loha, lokr, mixed
    family: str | None
    variant: str | None
    family_source: str  # "metadata modelspec.architecture=...", "module names", ""
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    coverage: Coverage | None = None
    problems: list[Problem] = field(default_factory=list)
    dtypes: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def raise_for_errors(self) -> None:
        if self.errors:
            raise PipelineError(self.problems)

    def ranks(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for m in self.modules.values():
            if m.rank is not None:
                out[m.rank] = out.get(m.rank, 0) + 1
        return dict(sorted(out.items()))

    def alphas(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.modules.values():
            k = "none" if m.alpha is None else f"{m.alpha:g}"
            out[k] = out.get(k, 0) + 1
        return out

    def as_dict(self) -> dict:
        return {
            "path": str(self.path), "format": self.layout, "kind": self.kind, "family": self.family,
            "variant": self.variant, "family_source": self.family_source, "modules": len(self.modules),
            "ranks": {str(k): v for k, v in self.ranks().items()}, "alphas": self.alphas(), "dtypes": self.dtypes,
            "metadata": self.metadata, "coverage": self.coverage.as_dict() if self.coverage else None,
            "problems": [{"severity": p.severity, "message": p.message, "fix": p.fix} for p in self.problems],
            "per_module": {n: {"module": m.module, "kind": m.kind, "rank": m.rank, "alpha": m.alpha,
                               "in": m.in_features, "out": m.out_features} for n, m in self.modules.items()},
        }


def _split_key(key: str) -> tuple[str, str, str] | None:
    """A tensor name -> (layout, module part, musubi param name), or None if not a LoRA key."""
    m = _PARAM_RE.match(key)
    if not m:
        return None
    body, param = m.group(1), _PARAM_NAMES[m.group(2)]
    if body.startswith(MUSUBI_PREFIX) and "." not in body:
        return MUSUBI, body, param
    for p in COMFY_PREFIXES:
        if body.startswith(p):
            return COMFYUI, body[len(p):], param
    return None


def detect_format(path: str | os.PathLike) -> str:
    """musubi or comfyui, from the tensor names alone (cheap: reads only the header). Used to
    refuse converting a file that is already in the target format."""
    st = SafetensorsFile(path)
    layouts = {s[0] for s in map(_split_key, st.tensors) if s}
    if len(layouts) == 1:
        return layouts.pop()
    if not layouts:
        raise _no_lora_tensors(path)
    raise _fail(path, "the file mixes musubi (lora_unet_*) and ComfyUI (diffusion_model.*) tensor names",
                "convert it with a tool that writes one layout")


def refuse_if_already(path: str | os.PathLike, target: str) -> None:
    """Raise when converting `path` to `target` (musubi/comfyui, or convert_lora's default/other) would do nothing."""
    target = {name: layout for layout, name in CONVERT_TARGET.items()}.get(target, target)
    fmt = detect_format(path)
    if fmt == target:
        other = COMFYUI if target == MUSUBI else MUSUBI
        raise _fail(path, f"the LoRA is already in {target} format", f"use it as it is, or convert to {other}")


def _module_kind(params: set[str]) -> str:
    if params & {"lora_down.weight", "lora_up.weight"}:
        return "lora"
    if any(p.startswith("hada_") for p in params):
        return "loha"
    if any(p.startswith("lokr_") for p in params):
        return "lokr"
    return "unknown"


def _scalar(st: SafetensorsFile, name: str) -> float | None:
    t = st.tensors[name]
    if math.prod(t.shape) != 1 or t.dtype.startswith("F8"):
        return None
    return float(st.float32(name).reshape(-1)[0])


def read_lora(path: str | os.PathLike, family: str | None = None, variant: str | None = None) -> LoraReport:
    """Inspect a LoRA file: layout, kind, family, ranks and alphas per module, metadata, key
    coverage and every problem found. Raises only when the file is not a readable safetensors."""
    st = SafetensorsFile(path)
    path = st.path
    problems: list[Problem] = []
    groups: dict[tuple[str, str], dict[str, str]] = {}
    stray: list[str] = []
    dtypes: dict[str, int] = {}
    for name, t in st.tensors.items():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
        s = _split_key(name)
        if s is None:
            stray.append(name)
            continue
        layout, body, param = s
        groups.setdefault((layout, body), {})[param] = name
    if not groups:
        raise _no_lora_tensors(path)
    if stray:
        problems.append(_problem(path, f"{len(stray)} tensors are not LoRA weights and are ignored, e.g. {stray[0]!r}",
                                 severity="warning"))
    layouts = {lay for lay, _ in groups}
    layout = layouts.pop() if len(layouts) == 1 else "mixed"
    if layout == "mixed":
        problems.append(_problem(path, "the file mixes musubi (lora_unet_*) and ComfyUI (diffusion_model.*) names",
                                 "convert it with a tool that writes one layout"))

    names = _all_module_names()
    modules: dict[str, LoraModule] = {}
    for (lay, body), params in groups.items():
        if lay == MUSUBI:
            ln, module = body, names.get(body, "")
        else:
            ln, module = lora_name_of(body), body
        kind = _module_kind(set(params))
        m = LoraModule(ln, module, kind, params)
        _check_module(st, m, lay, problems)
        modules[ln] = m
    kinds = {m.kind for m in modules.values()}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"

    # Architecture: metadata first (what musubi wrote), else the module names.
    fam, source = None, ""
    arch = st.metadata.get("modelspec.architecture", "")
    if arch:
        fam = family_of_modelspec(arch)
        source = f"metadata modelspec.architecture={arch}"
        if fam is None:
            problems.append(_problem(path, f"metadata says architecture {arch!r}, which is none of the families here "
                                     f"({', '.join(family_names())})", "use this LoRA with its own model family", severity="warning"))
    guessed, found_variant = _guess_family(modules)
    if fam is None and guessed:
        fam, source = guessed, "module names"
    elif fam and guessed and guessed != fam:
        problems.append(_problem(path, f"metadata says {fam} but the module names are {guessed}'s",
                                 "the metadata is wrong or the file was renamed; check which model it was trained on"))
    report = LoraReport(path, layout, kind, fam, None, source, modules, st.metadata, problems=problems, dtypes=dtypes)

    want = resolve_family(family) if family else None
    if want and fam and want != fam:
        problems.append(_problem(path, f"this is a LoRA of another architecture: {fam} ({source}), not {want}",
                                 f"use it with a {fam} model, or pick the {want} LoRA"))
    check_family = want or fam
    if check_family:
        var = variant or (found_variant if (guessed == check_family) else None)
        report.variant = var or _lora(check_family)["default_variant"]
        report.coverage = coverage(modules, check_family, report.variant)
        _coverage_problems(report)
    else:
        problems.append(_problem(path, "cannot tell which model family this LoRA is for (no modelspec.architecture "
                                 "metadata and unknown module names)", "pass --family to check it against a family",
                                 severity="warning"))
    return report


def _check_module(st: SafetensorsFile, m: LoraModule, layout: str, problems: list[Problem]) -> None:
    p = m.tensors
    where = m.module or m.lora_name
    if m.kind == "lora":
        if "lora_down.weight" not in p or "lora_up.weight" not in p:
            half = "lora_up (lora_B)" if "lora_up.weight" not in p else "lora_down (lora_A)"
            problems.append(_problem(st.path, f"{where}: {half} weight is missing", "the file is incomplete; re-save it"))
            return
        down, up = st.tensors[p["lora_down.weight"]].shape, st.tensors[p["lora_up.weight"]].shape
        if len(down) < 2 or len(up) < 2:
            problems.append(_problem(st.path, f"{where}: lora_down {list(down)} / lora_up {list(up)} are not matrices"))
            return
        if down[0] != up[1]:
            problems.append(_problem(st.path, f"{where}: mismatched ranks: lora_down {list(down)} has rank {down[0]} but "
                                     f"lora_up {list(up)} has rank {up[1]}", "the file is corrupt or was assembled from "
                                     "two LoRAs; re-save it from the training run"))
            return
        m.rank, m.in_features, m.out_features = down[0], math.prod(down[1:]), up[0]
    elif m.kind == "loha" and "hada_w1_b" in p and "hada_w1_a" in p:
        b, a = st.tensors[p["hada_w1_b"]].shape, st.tensors[p["hada_w1_a"]].shape
        m.rank, m.in_features, m.out_features = b[0], math.prod(b[1:]), a[0]
    elif m.kind == "lokr" and ("lokr_w1" in p or "lokr_w1_a" in p) and ("lokr_w2" in p or "lokr_w2_a" in p):
        w1 = st.tensors[p["lokr_w1"]].shape if "lokr_w1" in p else (
            st.tensors[p["lokr_w1_a"]].shape[0], st.tensors[p["lokr_w1_b"]].shape[1])
        w2 = st.tensors[p["lokr_w2"]].shape if "lokr_w2" in p else (
            st.tensors[p["lokr_w2_a"]].shape[0], st.tensors[p["lokr_w2_b"]].shape[-1])
        m.rank = st.tensors[p["lokr_w2_a"]].shape[1] if "lokr_w2_a" in p else None
        m.out_features, m.in_features = w1[0] * w2[0], w1[1] * w2[1]
    if "alpha" in p:
        t = st.tensors[p["alpha"]]
        value = _scalar(st, p["alpha"])
        if value is None:
            problems.append(_problem(st.path, f"{where}: alpha has shape {list(t.shape)}, expected a single number",
                                     "re-save the LoRA; musubi stores alpha as a 0-d tensor"))
        elif not math.isfinite(value) or value < 0:
            problems.append(_problem(st.path, f"{where}: alpha is {value}", "alpha must be a positive number"))
        else:
            m.alpha = value
    elif layout == MUSUBI and m.kind == "lora":
        problems.append(_problem(st.path, f"{where}: alpha is missing (musubi's loader needs {m.lora_name}.alpha and "
                                 "fails with a KeyError)", "add alpha = rank for scale 1, or convert the file with "
                                 "convert_lora.py --target default, which adds it"))




@lru_cache(maxsize=1)
def _family_hints() -> list[tuple[str, re.Pattern]]:
    """(family, a module-name pattern only that family's networks produce), from the registry."""
    return [(fam, re.compile(_lora(fam)["hint"])) for fam in family_names()]


def _guess_family(modules: dict[str, LoraModule]) -> tuple[str | None, str | None]:
    """The family whose modules match most names, and the variant whose shapes fit best."""
    votes: dict[str, int] = {}
    for ln in modules:
        for fam, pat in _family_hints():
            if pat.match(ln):
                votes[fam] = votes.get(fam, 0) + 1
    if not votes:
        return None, None
    # Families can share module names (FLUX.1 Kontext, FLUX.2 and HunyuanVideo): every family with a
    # vote competes on names and shapes, and votes only break a tie.
    best, best_score = (None, None), None
    for fam in sorted(votes, key=votes.get, reverse=True):
        for var in variants(fam):
            cov = coverage(modules, fam, var)
            score = cov.matched - 2 * len(cov.wrong_shape) - 2 * len(cov.unknown)
            if best_score is None or score > best_score:
                best, best_score = (fam, var), score
    return best


def coverage(modules: dict[str, LoraModule], family: str, variant: str) -> Coverage:
    targets = target_modules(family, variant)
    unknown = sorted(n for n in modules if n not in targets)
    missing = sorted(n for n in targets if n not in modules)
    wrong, misnamed = [], []
    for n, m in modules.items():
        t = targets.get(n)
        if t and m.module and m.module != t.module:
            misnamed.append(n)  # ComfyUI maps diffusion_model.<exact module name>; '_' vs '.' matters there
        elif t and m.in_features is not None and (m.in_features, m.out_features) != (t.in_features, t.out_features):
            wrong.append(n)
    return Coverage(resolve_family(family), variant, len(modules) - len(unknown) - len(wrong) - len(misnamed),
                    len(targets), unknown, missing, sorted(wrong), sorted(misnamed))


def _coverage_problems(r: LoraReport) -> None:
    c = r.coverage
    from ..pipelines import registry

    fam_title = registry.family(c.family).title
    if c.unknown:
        r.problems.append(_problem(r.path, f"{len(c.unknown)} of {len(r.modules)} modules are not {fam_title} modules "
                                   f"that musubi trains, so they would not load (\"lora key not loaded\"), e.g. "
                                   f"{c.unknown[0]}", "check that the LoRA is for this model family; convert a "
                                   "LoRA from another trainer with convert_lora.py"))
    if c.misnamed:
        m = r.modules[c.misnamed[0]]
        r.problems.append(_problem(r.path, f"{len(c.misnamed)} modules have mangled names that ComfyUI would not load, "
                                   f"e.g. {m.module!r} for the model's {target_modules(c.family, c.variant)[m.lora_name].module!r}",
                                   "convert the musubi-format file again with a converter that knows this family's "
                                   "module names (musubi's convert_lora.py mangles FramePack's), or use the musubi file"))
    if c.wrong_shape:
        ln = c.wrong_shape[0]
        m, t = r.modules[ln], target_modules(c.family, c.variant)[ln]
        r.problems.append(_problem(r.path, f"{len(c.wrong_shape)} modules have shapes for another model size than "
                                   f"{fam_title} {c.variant}, e.g. {m.module or ln}: {m.in_features}->{m.out_features}, "
                                   f"expected {t.in_features}->{t.out_features}",
                                   "use the LoRA with the model size it was trained on"))


# ---------------------------------------------------------------------------------------------
# Loading for numerics: module -> (down, up, alpha) in float32


@dataclass
class LoraWeights:
    """One LoRA in memory, keyed by musubi LoRA name. down: [rank, in], up: [out, rank]."""

    report: LoraReport
    st: SafetensorsFile

    def down_up(self, lora_name: str, copy: bool = True):
        m = self.report.modules[lora_name]
        down = self.st.float32(m.tensors["lora_down.weight"], copy)
        up = self.st.float32(m.tensors["lora_up.weight"], copy)
        return down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)

    def delta(self, lora_name: str, multiplier: float = 1.0):
        """The weight change this LoRA makes to one module: multiplier * alpha/rank * up @ down."""
        down, up = self.down_up(lora_name)
        return (up @ down) * (multiplier * self.report.modules[lora_name].scale)


def load_lora(path: str | os.PathLike, family: str | None = None) -> LoraWeights:
    """A LoRA ready for numerics; refuses files with errors and LyCORIS files."""
    report = read_lora(path, family)
    report.raise_for_errors()
    if report.kind != "lora":
        raise _fail(report.path, f"this is a LyCORIS {report.kind} file; merging supports plain LoRA only",
                    "merge LoHa/LoKr files into the model with the generate script's --lycoris option instead")
    return LoraWeights(report, SafetensorsFile(report.path))


# ---------------------------------------------------------------------------------------------
# Merging several LoRAs into one


@dataclass
class ModuleMerge:
    lora_name: str
    inputs: int  # how many inputs have this module
    rank: int  # rank written
    error: float = 0.0  # relative Frobenius error of the written delta (0 for exact)


@dataclass
class MergeResult:
    output: Path
    layout: str
    family: str | None
    modules: list[ModuleMerge]
    total_error: float  # relative Frobenius error over all modules together
    partial: list[str]  # modules present in only some inputs

    def summary(self) -> str:
        ranks = sorted({m.rank for m in self.modules})
        worst = max(self.modules, key=lambda m: m.error) if self.modules else None
        text = (f"wrote {self.output} ({self.layout} format, {len(self.modules)} modules, rank "
                f"{'/'.join(map(str, ranks))})")
        if worst and worst.error > 0:
            text += (f"\nrelative error of the weight change: {self.total_error:.3%} overall, worst module "
                     f"{worst.lora_name} {worst.error:.3%}")
        if self.partial:
            text += f"\n{len(self.partial)} modules are in only some inputs, e.g. {self.partial[0]}"
        return text


def parse_weighted(spec: str) -> tuple[str, float]:
    """'path:0.7' -> (path, 0.7); a Windows drive letter or a colon in the name stays part of the path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", tail):
        return head, float(tail)
    return spec, 1.0


def _gram_basis(gram):
    """For a tall matrix a [n, k] given by its Gram matrix a^T a: (T [k, k'], R [k', k]) with a @ T
    orthonormal and a = (a @ T) @ R, from the eigenvectors (directions with no weight are dropped)."""
    import numpy as np

    w, v = np.linalg.eigh(gram)
    keep = w > max(float(w.max()), 0.0) * 1e-12
    w, v = w[keep], v[:, keep]
    root = np.sqrt(w)
    return v / root, root[:, None] * v.T


def _exact(parts):
    """(up, down) of the merged delta by concatenating ranks; parts are (scale, up_i, down_i)."""
    import numpy as np

    up = np.concatenate([u * np.float32(scale) for scale, u, _ in parts], axis=1)
    return up, np.concatenate([d for _, _, d in parts], axis=0)


def _svd_factor(parts, rank: int, scratch: dict | None = None):
    """The best rank-`rank` factorisation (Eckart-Young) of sum_i scale_i * up_i @ down_i, from the
    SVD of a small core, so the full out x in matrix is never formed: (up, down, relative error,
    squared Frobenius norm of the merged delta). Exact concatenation when the ranks sum to at most
    `rank`. Every product here is thin (k = sum of ranks, ~64 columns), so it runs on one BLAS
    thread; merge_loras runs modules side by side instead. `scratch` keeps the float64 copies'
    memory between calls (a fresh allocation of each costs more than the products)."""
    import numpy as np

    k = sum(u.shape[1] for _, u, _ in parts)
    out, inn = parts[0][1].shape[0], parts[0][2].shape[1]
    up64 = _scratch(scratch, "up", (out, k))
    down64 = _scratch(scratch, "down", (k, inn))
    scales = np.empty(k)
    at = 0
    for scale, u, d in parts:  # float64 copies, unscaled: the scales enter the k x k matrices only
        r = u.shape[1]
        up64[:, at:at + r], down64[at:at + r], scales[at:at + r] = u, d, scale
        at += r
    gram_up = (up64.T @ up64) * np.outer(scales, scales)  # Gram of the scaled up
    gram_down = down64 @ down64.T
    norm2 = float(np.sum(gram_up * gram_down))  # ||up @ down||_F^2 = trace((U^T U)(D D^T))
    if rank >= k:
        return (*_exact(parts), 0.0, norm2)
    tu, ru = _gram_basis(gram_up)  # scaled up = (scaled up @ tu) @ ru
    td, rd = _gram_basis(gram_down)  # down^T = (down^T @ td) @ rd
    u, s, vt = np.linalg.svd(ru @ rd.T)
    total = float(np.sum(s * s))
    keep = min(rank, s.size)
    error = math.sqrt(max(total - float(np.sum(s[:keep] ** 2)), 0.0) / total) if total > 0 else 0.0
    root = np.sqrt(s[:keep])
    # The new factors are written as float32, so they are products of the float32 inputs
    # (half the work of float64): up_i @ (its rows of the k x rank map), summed over inputs.
    to_up = (scales[:, None] * (tu @ u[:, :keep]) * root).astype(np.float32)
    to_down = (root[:, None] * (vt[:keep] @ td.T)).astype(np.float32)
    new_up = np.zeros((out, rank), np.float32)
    new_down = np.zeros((rank, inn), np.float32)
    at = 0
    for _, u, d in parts:
        r = u.shape[1]
        new_up[:, :keep] += _as_float32(u) @ to_up[at:at + r]
        new_down[:keep] += to_down[:, at:at + r] @ _as_float32(d)
        at += r
    return new_up, new_down, error, norm2


def _scratch(scratch: dict | None, name: str, shape: tuple[int, int]):
    import numpy as np

    if scratch is None:
        return np.empty(shape)
    size = shape[0] * shape[1]
    if scratch.get(name) is None or scratch[name].size < size:
        scratch[name] = np.empty(size)
    return scratch[name][:size].reshape(shape)


def _as_float32(a):
    import numpy as np

    return a if a.dtype == np.float32 else a.astype(np.float32)


def _in_order(fn, items, workers: int):
    """fn(item) for each item, computed on `workers` threads at most 2 * workers ahead of the
    consumer (bounded memory), yielded in order. numpy releases the GIL in the heavy parts."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    items = iter(items)
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(fn, item) for _, item in zip(range(2 * workers), items))
        while pending:
            result = pending.popleft().result()
            for item in items:
                pending.append(pool.submit(fn, item))
                break
            yield result


def _merge_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


def merge_loras(output: str | os.PathLike, inputs: list[tuple[str | os.PathLike, float]], rank: int | None = None,
                layout: str | None = None, dtype: str | None = None, family: str | None = None,
                force: bool = False) -> MergeResult:
    """Merge LoRAs with weights into one LoRA whose weight change is sum_i w_i * alpha_i/r_i * up_i @ down_i.
    Exact by concatenating ranks (alpha = new rank, so scale 1), or re-factorised to `rank` by SVD."""
    import numpy as np

    output = Path(output)
    if not inputs:
        raise PipelineError([Problem("no input LoRAs given", fix="give two or more LoRA files, each as PATH or PATH:WEIGHT")])
    _refuse_existing(output, force)  # before loading the inputs, which can take a while
    if rank is not None and rank < 1:
        raise PipelineError([Problem(f"rank must be at least 1, got {rank}", path="rank")])
    loras = [load_lora(p, family) for p, _ in inputs]
    weights = [float(w) for _, w in inputs]
    problems: list[Problem] = []
    fams = {lw.report.family for lw in loras}
    if len(fams) > 1:
        listing = ", ".join(f"{lw.report.path.name}: {lw.report.family or 'unknown'}" for lw in loras)
        problems.append(Problem(f"the LoRAs are for different architectures ({listing})",
                                fix="merge only LoRAs trained for the same model"))
    for lw in loras[1:]:
        for ln, m in lw.report.modules.items():
            m0 = next((x.report.modules[ln] for x in loras if ln in x.report.modules), None)
            if m0 and (m.in_features, m.out_features) != (m0.in_features, m0.out_features):
                problems.append(Problem(f"{ln}: {lw.report.path.name} has shape {m.in_features}->{m.out_features} but "
                                        f"another input has {m0.in_features}->{m0.out_features}", file=str(lw.report.path),
                                        fix="merge only LoRAs for the same model size"))
                break
    if problems:
        raise PipelineError(problems)
    layout = layout or loras[0].report.layout
    if layout not in CONVERT_TARGET:
        raise PipelineError([Problem(f"unknown LoRA format {layout!r}", path="format", fix="use musubi or comfyui")])
    if dtype is None:  # the widest input dtype
        seen = {d for lw in loras for d in lw.report.dtypes}
        dtype = "float32" if "F32" in seen or "F64" in seen else ("float16" if "F16" in seen else "bfloat16")
    if dtype not in _OUT_DTYPES:
        raise PipelineError([Problem(f"unknown dtype {dtype!r}", path="dtype", fix="use float32, float16 or bfloat16")])
    st_dtype = _OUT_DTYPES[dtype]

    names: list[str] = []
    for lw in loras:
        names += [n for n in lw.report.modules if n not in names]
    plan: list[tuple[str, list[int], int]] = []  # lora name, which inputs, written rank
    for ln in names:
        which = [i for i, lw in enumerate(loras) if ln in lw.report.modules]
        k = sum(loras[i].report.modules[ln].rank for i in which)
        plan.append((ln, which, k if rank is None else min(rank, k)))

    def out_key(ln: str, param: str) -> str:
        if layout == MUSUBI:
            return f"{ln}.{param}"
        module = next(lw.report.modules[ln].module for lw in loras if ln in lw.report.modules) or ln[len(MUSUBI_PREFIX):]
        return f"diffusion_model.{module}.{'lora_A.weight' if param == 'lora_down.weight' else 'lora_B.weight'}"

    entries: list[tuple[str, str, tuple[int, ...]]] = []
    for ln, which, r in plan:
        m = loras[which[0]].report.modules[ln]
        entries.append((out_key(ln, "lora_down.weight"), st_dtype, (r, m.in_features)))
        entries.append((out_key(ln, "lora_up.weight"), st_dtype, (m.out_features, r)))
        if layout == MUSUBI:  # ComfyUI's layout has no alpha: scale 1, as convert_lora.py writes it
            entries.append((f"{ln}.alpha", st_dtype, ()))

    results: list[ModuleMerge] = []
    err_num = err_den = 0.0
    scratch = threading.local()

    def merged(item):
        ln, which, _ = item
        parts = []
        for i in which:
            down, up = loras[i].down_up(ln, copy=False)
            parts.append((weights[i] * loras[i].report.modules[ln].scale, up, down))
        if rank is None:
            return (*_exact(parts), 0.0, 0.0)
        return _svd_factor(parts, rank, scratch.__dict__)

    def arrays() -> Iterator:
        nonlocal err_num, err_den
        for (ln, which, r), (up, down, error, norm2) in zip(plan, _in_order(merged, plan, _merge_workers())):
            err_num += error * error * norm2
            err_den += norm2
            results.append(ModuleMerge(ln, len(which), r, error))
            yield down
            yield up
            if layout == MUSUBI:
                yield np.array(r, dtype=np.float32)

    metadata = _merged_metadata(loras, weights, rank, plan)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):  # see _svd_factor
        write_safetensors(output, entries, arrays(), metadata, force=force)
    total = math.sqrt(err_num / err_den) if err_den else 0.0
    partial = [ln for ln, which, _ in plan if len(which) < len(loras)]
    return MergeResult(output, layout, loras[0].report.family, results, total, partial)


def _merged_metadata(loras: list[LoraWeights], weights: list[float], rank: int | None, plan) -> dict[str, str]:
    first = loras[0].report.metadata
    meta = {k: first[k] for k in ("modelspec.architecture", "modelspec.implementation", "ss_network_module",
                                  "ss_base_model_version") if k in first}
    ranks = {r for _, _, r in plan}
    if len(ranks) == 1:
        meta["ss_network_dim"] = meta["ss_network_alpha"] = str(ranks.pop())
    meta["musubi_pipe.merged_from"] = json.dumps(
        [{"file": lw.report.path.name, "weight": w} for lw, w in zip(loras, weights)])
    meta["musubi_pipe.merge"] = "svd" if rank is not None else "exact"
    if rank is not None:
        meta["musubi_pipe.merge_rank"] = str(rank)
    return meta


# ---------------------------------------------------------------------------------------------
# Post-hoc EMA: which weight each checkpoint gets (the maths of musubi's lora_post_hoc_ema.py)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Karras et al. 2023, algorithm 2: the positive root of g^3 + 7g^2 + (16 - s^-2)g + (12 - s^-2)."""
    import numpy as np

    t = sigma_rel ** -2
    roots = np.roots([1, 7, 16 - t, 12 - t])
    real = roots[np.isreal(roots) & (roots.real >= 0)].real
    if real.size == 0:
        raise PipelineError([Problem(f"sigma_rel {sigma_rel} gives no positive gamma", path="sigma_rel",
                                     fix="use a sigma_rel between 0 and about 0.28, e.g. 0.2")])
    return float(real.max())


def ema_betas(count: int, beta: float = 0.95, beta2: float | None = None, sigma_rel: float | None = None) -> list[float]:
    """The decay used when folding in checkpoint 2..count, as lora_post_hoc_ema.py computes it."""
    merges = count - 1
    if sigma_rel is not None:
        gamma = sigma_rel_to_gamma(sigma_rel)
        return [(1 - 1 / t) ** (gamma + 1) for t in range(1, merges + 1)]
    beta2 = beta if beta2 is None else beta2
    return [beta + (beta2 - beta) * (i / (merges - 1)) if merges > 1 else beta for i in range(merges)]


def ema_coefficients(count: int, beta: float = 0.95, beta2: float | None = None,
                     sigma_rel: float | None = None) -> list[float]:
    """The share of each checkpoint (oldest first) in the EMA result; they sum to 1."""
    coeffs = [1.0]
    for b in ema_betas(count, beta, beta2, sigma_rel):
        coeffs = [c * b for c in coeffs] + [1 - b]
    return coeffs
