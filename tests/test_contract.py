"""The argparse re-check: check() answers plain argv (what the compiler writes) without argparse;
it must accept and reject exactly what the recorded parser does, message included."""
import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from musubi_pipe.compiler import compile_file, contract

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem + ".py" for p in (contract.CONTRACT_ROOT / contract.CONTRACT).glob("*.json"))


def full_parser_says(script: str, args: list[str]) -> str | None:
    try:
        contract.parser(script).parse_args(args)
    except contract.ContractError as exc:
        return str(exc)
    return None


def words(script: str):
    spec = json.loads((contract.CONTRACT_ROOT / contract.CONTRACT / script.replace(".py", ".json")).read_text())
    flags = [f for a in spec["args"] for f in a["flags"] if f.startswith("-")]
    choices = [str(c) for a in spec["args"] for c in (a["choices"] or [])]
    values = ["1", "0.5", "x", "-5", "-blurry", "a b", "--", ""] + choices
    prefixes = [f[:-2] for f in flags if len(f) > 4]  # abbreviations, which musubi's parsers refuse here
    joined = [f"{f}={v}" for f in flags[:20] for v in ("1", "-x")]
    return st.sampled_from(flags + values + prefixes + joined + ["--no_such_option", "positional"])


@st.composite
def argvs(draw):
    script = draw(st.sampled_from(SCRIPTS))
    return script, draw(st.lists(words(script), max_size=12))


@st.composite
def plain_argvs(draw):
    """Mostly well-formed argv: options with as many values as they take, of their type and
    choices; now and then one value too many or too few, a wrong type, or --flag=value."""
    script = draw(st.sampled_from(SCRIPTS))
    opts = list(contract.options(script).values())
    args: list[str] = []
    for opt in draw(st.lists(st.sampled_from(opts), max_size=8)) + [o for o in opts if o.required]:
        good = value(opt)
        count = len(good) if opt.action not in ("store_true", "store_false") else 0
        if opt.nargs in ("*", "+"):
            count = draw(st.integers(0, 3))
        count += draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
        words = [draw(st.sampled_from((good or ["1"]) + ["2", "0.5", "x", "a b", "", "-3"])) for _ in range(max(count, 0))]
        if opt.action == "positional":
            args = words + args
        elif words and opt.nargs is None and draw(st.booleans()):
            args.append(f"{opt.flag}={words[0]}")
        else:
            args += [opt.flag, *words]
    return script, args


@settings(max_examples=400, deadline=None)
@given(st.one_of(argvs(), plain_argvs()))
def test_check_agrees_with_argparse(case):
    script, args = case
    assert contract.check(script, args) == full_parser_says(script, args)


def test_the_compilers_argv_is_answered_without_argparse(tmp_path):
    plans = [compile_file(p) for p in sorted((ROOT / "pipelines" / "examples").glob("*.toml")) if p.name != "dataset.toml"]
    steps = [s for plan in plans for s in plan.steps if s.launcher != "musubi-pipe"]
    assert len(steps) > 15
    for step in steps:
        assert contract._plainly_accepted(step.script, step.args), (step.script, step.args)
    assert not contract._plainly_accepted("wan_generate_video.py", ["--prompt", "-a"])
    assert not contract._plainly_accepted("wan_generate_video.py", ["--prompt", "a"])  # --save_path is required
    krea = ["--dit", "d", "--vae", "v", "--text_encoder", "t", "--save_path", "s"]
    assert contract._plainly_accepted("krea2_generate_image.py", ["a fox"] + krea)  # a '?' positional: one word first
    assert contract._plainly_accepted("krea2_generate_image.py", krea) and contract.check("krea2_generate_image.py", krea) is None
    assert not contract._plainly_accepted("krea2_generate_image.py", ["a", "fox"] + krea)
    assert contract.check("krea2_generate_image.py", ["a", "fox"] + krea) is not None


def value(opt) -> list[str]:
    word = str(opt.choices[0]) if opt.choices else "1"
    return [word] * (opt.nargs if isinstance(opt.nargs, int) else 1)


def test_every_script_accepts_its_required_options_and_names_the_missing_one():
    checked = 0
    for script in SCRIPTS:
        required = [o for o in contract.options(script).values() if o.required]
        argv = [w for o in required for w in ([] if o.action == "positional" else [o.flag]) + value(o)]
        assert contract.check(script, argv) is None, (script, argv)
        if required and required[0].action != "positional":
            message = contract.check(script, argv[2:])
            assert message == full_parser_says(script, argv[2:]) and required[0].flag in message
            checked += 1
    assert checked > 20


