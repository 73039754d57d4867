"""Count what happens to hostile and generated documents (issue 13's closing note): each input
is validated as `musubi-pipe validate` does (compile, then the input check), in a forked child
limited to 512 MB of address space and 20 s. Prints: inputs tried, clear messages (every
problem with a file, errors with a fix), tracebacks, hangs, wrongly accepted.

    python benchmarks/hostile_documents.py [--generated 600] [--seed 13]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests")]

MEMORY = 512 << 20
TIMEOUT = 20.0
HEAD = 'name = "hostile"\nfamily = "wan"\ntask = "t2v-1.3B"\n'
STAGE = '[stages.train]\nkind = "train"\n'


def named_attacks() -> list[tuple[str, dict[str, str | bytes]]]:
    """(name, {file: content}); the pipeline is the first file. Every one must be refused."""
    bomb = ["name: hostile", "family: wan", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    bomb += [f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    deep = "[" * 20000 + "]" * 20000
    attacks = [
        ("yaml alias bomb", {"p.yaml": "\n".join(bomb) + "\n"}),
        ("yaml alias cycle", {"p.yaml": "name: hostile\nfamily: wan\nvars: &v\n  x: [*v]\n"}),
        ("yaml duplicate stage", {"p.yaml": "name: hostile\nfamily: wan\nstages:\n  t:\n    kind: train\n  t:\n    kind: train\n"}),
        ("json duplicate key", {"p.toml": HEAD + 'dataset = "d.json"\n', "d.json": '{"datasets": [], "datasets": []}'}),
        ("toml deep", {"p.toml": HEAD + f"a = {deep}\n"}),
        ("yaml deep", {"p.yaml": f"name: x\nfamily: wan\nvars: {deep}\n"}),
        ("json deep", {"p.toml": HEAD + 'dataset = "d.json"\n', "d.json": '{"datasets": ' + deep + "}"}),
        ("too many values", {"p.toml": HEAD + "[vars]\nx = [" + ",".join(["1"] * 200_000) + "]\n"}),
        ("5000-digit int toml", {"p.toml": HEAD + STAGE + "network_dim = " + "9" * 5000 + "\n"}),
        ("5000-digit int yaml", {"p.yaml": "name: x\nfamily: wan\nvars:\n  x: " + "9" * 5000 + "\n"}),
        ("python tag", {"p.yaml": "name: !!python/object/apply:os.system ['true']\nfamily: wan\n"}),
        ("dataset /dev/zero", {"p.toml": HEAD + 'dataset = "/dev/zero"\n'}),
        ("dataset folder", {"p.toml": HEAD + 'dataset = "."\n'}),
        ("dataset 8 GiB sparse", {"p.toml": HEAD + 'dataset = "big.toml"\n', "big.toml": None}),
        ("pipeline 5 MB name", {"p.toml": HEAD.replace("hostile", "a" * (5 << 20))}),
        ("pipeline 5000-char name", {"p.toml": HEAD.replace("hostile", "a" * 5000)}),
        ("70000-char string", {"p.toml": HEAD + f'[vars]\nx = "{"a" * 70000}"\n'}),
        ("binary pipeline", {"p.toml": HEAD.encode() + b"\xff\xfe\x00"}),
        ("vars doubling", {"p.toml": HEAD + "[vars]\nv0 = \"ab\"\n" + "\n".join(f'v{i} = "{{{{ v{i-1} }}}}{{{{ v{i-1} }}}}"' for i in range(1, 61)) + "\n"}),
        ("9000 refs to a 60k var", {"p.toml": HEAD + 'workdir = "' + "{{ v }}" * 9000 + '"\n[vars]\nv = "' + "a" * 60000 + '"\n'}),
        ("3000 templates", {"p.toml": HEAD + "[vars]\n" + "\n".join(f'x{i} = "{{{{ {i} + 1 }}}}"' for i in range(3000)) + "\n"}),
    ]
    for template in ["{{ 'a' * 2000000000 }}", "{{ 7 ** 99999999 }}", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "{{ range(10**12) | list }}", "{{ 'a' | center(2000000000) }}", "{{ 'a'.ljust(2000000000) }}", "{{ name.__class__ }}",
                     "{{ '%2000000000d' % 1 }}", "{{ ('a' * 60000) | replace('', 'bbbbbbbbbb') }}", "{% set x = 1 %}", "{{ lipsum(10**9) }}",
                     "{% include '/etc/passwd' %}", "{{ foo( }}", "{% if x %}", "{{ undefined_thing }}", "{{ 1 / 0 }}",
                     "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "{{ namespace() }}", "{{ x|attr('__class__') }}"]:
        attacks.append((f"template {template[:30]}", {"p.toml": HEAD + f"workdir = '''{template}'''\n"}))
    for setting in ["network_dim = -4", "learning_rate = -1e-4", "learning_rate = nan", "network_alpha = inf", "blocks_to_swap = -1",
                    "num_processes = 0", "max_train_epochs = 0", "max_train_steps = -5", "gradient_accumulation_steps = 0",
                    "save_every_n_epochs = 0", "network_dropout = 1.5", "seed = 4294967296", "seed = -1", "max_timestep = 5000",
                    "gpu_memory_gib = -24", "discrete_flow_shift = 0", "num_machines = 0", "max_data_loader_n_workers = -2",
                    "extra_args = { max_grad_norm = nan }", "save_last_n_epochs = 0", "sample_every_n_epochs = 0"]:
        attacks.append((f"value {setting}", {"p.toml": HEAD + STAGE + setting + "\n"}))
    for setting in ["resolution = [0, -480]", "batch_size = 0", "num_repeats = 0", "resolution = -5"]:
        attacks.append((f"dataset {setting}", {"p.toml": HEAD + f'[dataset.general]\n{setting}\n[[dataset.datasets]]\nimage_directory = "."\n'}))
    for setting in ["video_size = [0, 480]", "infer_steps = 0", "flow_shift = -1", "fps = 0", "video_length = -1",
                    'loras = [{ path = "l.safetensors", multiplier = nan }]', "seed = -3"]:
        attacks.append((f"generate {setting}", {"p.toml": HEAD + f'[stages.g]\nkind = "generate"\nprompt = "p"\n{setting}\n'}))
    attacks.append(("source_fps inf", {"p.toml": HEAD + '[[dataset.datasets]]\nvideo_directory = "."\nsource_fps = inf\n'}))
    return attacks


def generated(n: int, seed: int) -> list[tuple[str, dict[str, str]]]:
    """Seeded mutations of the examples, values in random places and random templates."""
    import copy

    import tomli_w

    from test_fuzz_documents import ATOMS, BASE, DOCUMENTS, FILTERS, KEYS, OPS, PLACES, TOKENS

    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            path = rng.choice(DOCUMENTS)
            text = path.read_text(encoding="utf-8")
            for _ in range(rng.randint(1, 6)):
                start = rng.randint(0, len(text))
                text = text[:start] + rng.choice(TOKENS) * rng.randint(1, 3) + text[start + rng.randint(0, 40):]
            out.append((f"mutated {path.name} #{i}", {f"p{path.suffix}": text}))
        elif kind == 1:
            doc = copy.deepcopy(BASE)
            for _ in range(rng.randint(1, 4)):
                node = doc
                for part in rng.choice(PLACES):
                    node = node.setdefault(part, {}) if isinstance(node, dict) else (node[part] if isinstance(node, list) else node)
                if isinstance(node, dict):
                    node[rng.choice(KEYS)] = rng.choice([None, True, -1, 0, 2**70, float("nan"), float("inf"), -0.5, "", "@train.lora",
                                                         "{{ x }}", "{{ 1/0 }}", "x" * 5000, [], [1, "a"], {"k": -1}, {"kind": "train"}])
            try:
                text = tomli_w.dumps(_no_none(doc))
            except (TypeError, ValueError):
                continue
            out.append((f"values #{i}", {"p.toml": text}))
        else:
            def expr(depth):
                if depth == 0 or rng.random() < 0.5:
                    return rng.choice(ATOMS) + rng.choice(FILTERS)
                return "(" + expr(depth - 1) + rng.choice(OPS) + expr(depth - 1) + ")" + rng.choice(FILTERS)
            template = "".join(rng.choice(["{{ %s }}", "/p-%s", "{%% if %s %%}y{%% endif %%}", "{%% for i in %s %%}{{ i }}{%% endfor %%}"]) % expr(rng.randint(0, 4))
                               for _ in range(rng.randint(1, 3)))
            text = HEAD + "workdir = '''" + template + "'''\n[vars]\nx = \"abc\"\nn = 7\nbig = \"" + "b" * 1000 + "\"\n"
            out.append((f"template #{i}", {"p.toml": text}))
    return out


def _no_none(value):
    if isinstance(value, dict):
        return {k: _no_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_no_none(v) for v in value if v is not None]
    return value


def _child(folder: str, pipeline: str, conn) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    try:
        from musubi_pipe.compiler import compile_file
        from musubi_pipe.dsl.inputs import check_file
        from musubi_pipe.errors import PipelineError

        try:
            plan = compile_file(Path(folder) / pipeline)
            check_file(Path(folder) / pipeline, "warning", produced_under=plan.workdir)
            conn.send(("accepted", ""))
        except PipelineError as err:
            errors = [p for p in err.problems if p.severity == "error"]
            clear = bool(errors) and all(p.file and p.message for p in err.problems) and all(p.fix for p in errors)
            conn.send(("clear" if clear else "unclear", str(err)[:300]))
    except BaseException as exc:  # noqa: BLE001 - counting exactly these
        import traceback

        conn.send(("traceback", "".join(traceback.format_exception_only(type(exc), exc))[:300]))


def classify(files: dict) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as folder:
        for name, content in files.items():
            path = Path(folder) / name
            if content is None:
                with open(path, "wb") as f:
                    f.truncate(8 << 30)
            else:
                path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        ctx = multiprocessing.get_context("fork")
        ours, theirs = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(folder, next(iter(files)), theirs))
        proc.start()
        proc.join(TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join()
            return "hang", ""
        return ours.recv() if ours.poll() else ("traceback", f"child ended with {proc.exitcode}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generated", type=int, default=600)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    import musubi_pipe.compiler  # noqa: F401 - imported once, before forking
    import musubi_pipe.dsl.inputs  # noqa: F401

    counts = {"hostile": {}, "generated": {}}
    for group, inputs in (("hostile", named_attacks()), ("generated", generated(args.generated, args.seed))):
        for name, files in inputs:
            outcome, detail = classify(files)
            counts[group][outcome] = counts[group].get(outcome, 0) + 1
            wrong = group == "hostile" and outcome == "accepted"
            if outcome in ("traceback", "hang", "unclear") or wrong:
                print(f"{group} {name}: {outcome} {detail}", file=sys.stderr)
    hostile, gen = counts["hostile"], counts["generated"]
    total = sum(hostile.values()) + sum(gen.values())
    print(json.dumps({
        "inputs tried": total,
        "hostile": sum(hostile.values()), "generated": sum(gen.values()),
        "clear messages": hostile.get("clear", 0) + gen.get("clear", 0),
        "accepted (generated, valid)": gen.get("accepted", 0),
        "unclear messages": hostile.get("unclear", 0) + gen.get("unclear", 0),
        "tracebacks": hostile.get("traceback", 0) + gen.get("traceback", 0),
        "hangs": hostile.get("hang", 0) + gen.get("hang", 0),
        "wrongly accepted (hostile)": hostile.get("accepted", 0),
    }, indent=1))


if __name__ == "__main__":
    main()
