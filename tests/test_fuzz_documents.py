"""Generated documents and templates: reading and compiling any of them ends in a plan or in
PipelineError (messages with a place), never another exception, within bounded memory and time
(issue 13). The named attacks are in test_hostile_documents.py."""
from __future__ import annotations

import copy
import os
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from musubi_pipe.compiler import compile_pipeline
from musubi_pipe.dsl.limits import MAX_STRING
from musubi_pipe.dsl.load import Source, parse_pipeline, validate_pipeline
from musubi_pipe.errors import PipelineError

EXAMPLES = Path(__file__).resolve().parent.parent / "pipelines" / "examples"
DOCUMENTS = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".toml", ".yaml") and p.name != "dataset.toml")
PEAK_BYTES = 300 << 20  # what one document may cost to read and compile; real ones take about 1 MB
# hypothesis' deadline is the time bound: generous, for a loaded 2-core machine.
# MUSUBI_FUZZ_EXAMPLES=5000 searches longer.
FUZZ = settings(max_examples=int(os.environ.get("MUSUBI_FUZZ_EXAMPLES", "150")), deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Pieces a hostile user types: syntax, aliases, numbers musubi cannot use, templates.
TOKENS = ["[", "]", "[[", "]]", "{", "}", "{{", "}}", "{%", "%}", "{{ x }}", "{{ 'a' * 99999999 }}", "{% for i in range(99999) %}",
          "&a", "*a", "<<: *a", "- ", ": ", " = ", '"', "'", "'''", "\n", "\n  ", "#", "nan", "inf", "-inf", "-1", "0", "1e999",
          "9" * 5000, "true", "null", "~", "!!python/object:os.system", "!!binary", "!!set", "? ", "@train.lora", "../" * 20,
          "/dev/zero", "\x00", "\ufeff", "é", "kind = \"train\"", "[stages.x]", "network_dim = -4", "stages:", "  train:",
          "    kind: train", "vars:", "  x: &a [1, 2]", "  y: [*a, *a, *a]"]


def _compile(text: str, fmt: str) -> None:
    """Parse, validate and compile; only PipelineError may escape, and the cost is bounded."""
    tracemalloc.start()
    try:
        try:
            pipeline, source = parse_pipeline(text, file=f"/fuzz/doc.{fmt}", fmt=fmt)
            compile_pipeline(pipeline, source)
        except PipelineError as err:
            assert err.problems and all(p.message for p in err.problems)
            assert all(p.file for p in err.problems), err
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"{peak >> 20} MB to read a {len(text)}-character document"


@st.composite
def mutated(draw):
    """An example pipeline with a few spans replaced by hostile pieces."""
    path = draw(st.sampled_from(DOCUMENTS))
    text = path.read_text(encoding="utf-8")
    for _ in range(draw(st.integers(1, 6))):
        start = draw(st.integers(0, len(text)))
        end = min(len(text), start + draw(st.integers(0, 40)))
        piece = draw(st.one_of(st.sampled_from(TOKENS), st.text(max_size=12)))
        text = text[:start] + piece * draw(st.integers(1, 3)) + text[end:]
    return text, "yaml" if path.suffix == ".yaml" else "toml"


@given(mutated())
@FUZZ
def test_mutated_example_documents(doc):
    _compile(*doc)


# Values of every kind, in any place of a valid document.
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=30), st.sampled_from(["@train.lora", "@nope.x", "{{ x }}", "{{ 1/0 }}", "-rf", "a;b", "/dev/zero", "x" * 5000])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
BASE = {
    "name": "fuzz", "family": "wan", "task": "t2v-1.3B",
    "vars": {"x": "v"},
    "models": {"dit": "/m/dit.safetensors", "vae": "/m/vae.safetensors", "t5": "/m/t5.pth"},
    "dataset": {"general": {"resolution": [64, 48], "caption_extension": ".txt"},
                "datasets": [{"video_directory": "/d/clips", "target_frames": [1, 25]}]},
    "stages": {
        "cache_latents": {"kind": "cache_latents"},
        "cache_text": {"kind": "cache_text_encoder"},
        "train": {"kind": "train", "network_dim": 8, "max_train_epochs": 2, "save_every_n_epochs": 1},
        "preview": {"kind": "generate", "prompt": "p", "loras": [{"path": "@train.lora", "multiplier": 1.0}]},
    },
}
PLACES = [("vars",), ("models",), ("dataset", "general"), ("dataset", "datasets", 0), ("stages", "train"), ("stages", "preview"),
          ("stages", "train", "extra_args"), ("defaults",), ()]
KEYS = ["network_dim", "learning_rate", "blocks_to_swap", "seed", "resolution", "num_repeats", "target_frames", "source_fps",
        "loras", "prompt", "dit", "x", "kind", "needs", "video_size", "multiplier", "name", "family", "train", "max_grad_norm"]


@given(st.lists(st.tuples(st.sampled_from(PLACES), st.sampled_from(KEYS), VALUES), min_size=1, max_size=4))
@FUZZ
def test_any_value_in_any_place(changes):
    doc = copy.deepcopy(BASE)
    for place, key, value in changes:
        node = doc
        for part in place:
            if isinstance(node, dict):
                node = node.setdefault(part, {})
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                break
        if isinstance(node, dict):
            node[key] = value
    tracemalloc.start()
    try:
        try:
            source = Source(file="/fuzz/doc.toml", text="", format="toml")
            compile_pipeline(validate_pipeline(doc, source), source)
        except PipelineError as err:
            assert err.problems
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES


# Templates from the parts of Jinja, allowed and not.
ATOMS = ["x", "n", "big", "name", "nothing", "'a'", "'%s'", "2000000000", "99", "1.5", "-3", "0", "range(100000)", "lipsum(99999)",
         "namespace()", "x.__class__", "[x, x]", "(x)"]
OPS = [" * ", " ** ", " + ", " - ", " / ", " // ", " % ", " ~ ", " and ", " or ", " == ", " in "]
FILTERS = ["", "|lower", "|upper", "|replace('', big)", "|replace('a', 'bb')", "|int", "|float", "|center(2000000000)", "|list",
           "|join", "|length", "|default('d')", "|round", "|title", "|trim"]


@st.composite
def templates(draw):
    def expr(depth: int) -> str:
        if depth == 0 or draw(st.booleans()):
            return draw(st.sampled_from(ATOMS)) + draw(st.sampled_from(FILTERS))
        return "(" + expr(depth - 1) + draw(st.sampled_from(OPS)) + expr(depth - 1) + ")" + draw(st.sampled_from(FILTERS))

    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["out", "out", "text", "if", "for", "set", "broken"]))
        e = expr(draw(st.integers(0, 4)))
        parts.append({"out": "{{ " + e + " }}", "text": "/p-", "if": "{% if " + e + " %}y{% else %}n{% endif %}",
                      "for": "{% for i in " + e + " %}{{ i }}{% endfor %}", "set": "{% set q = " + e + " %}",
                      "broken": "{{ " + e}[kind])
    return "".join(parts)


@given(templates(), st.integers(1, 60))
@FUZZ
def test_generated_templates(template, chain):
    # `chain` variables, each the one before it twice: the bound holds through [vars] too
    lines = [f'v0 = "{{{{ big }}}}"'] + [f'v{i} = "{{{{ v{i - 1} }}}}{{{{ v{i - 1} }}}}"' for i in range(1, chain)]
    text = ('name = "fuzz"\nfamily = "wan"\nworkdir = """' + template.replace("\\", "\\\\").replace('"', '\\"') + '"""\n'
            '[vars]\nx = "abc"\nn = 7\nbig = "' + "b" * 1000 + '"\n' + "\n".join(lines) + "\n")
    tracemalloc.start()
    try:
        try:
            pipeline, _ = parse_pipeline(text, file="/fuzz/t.toml")
            assert len(pipeline.workdir) <= MAX_STRING
        except PipelineError as err:
            assert all(p.message and p.file == "/fuzz/t.toml" for p in err.problems)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"{peak >> 20} MB for {template!r}"


@pytest.mark.parametrize("fmt", ["toml", "yaml"])
@given(text=st.text(max_size=400))
@FUZZ
def test_arbitrary_text(fmt, text):
    _compile(text, fmt)
