"""The registry holds the design: musubi knowledge lives in pipelines/ as data, and code reads it.

A test fails when product code spells a family name, a task name or a musubi flag (`--name`)
outside the registry, and when a family file is incomplete or disagrees with the recorded
command-line contract."""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from musubi_pipe.compiler import contract
from musubi_pipe.pipelines import registry

ROOT = Path(__file__).resolve().parent.parent
# Where spelling musubi's words is the point, with the reason.
ALLOWED_FILES = {
    "pipelines/registry.py": "the registry's loader",
    "compiler/contract.py": "renders any recorded option generically ('--' + dest)",
}
SKIPPED_DIRS = ("tests", "benchmarks", ".ci", "build", ".git")


def product_files(root: Path = ROOT) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in SKIPPED_DIRS or rel.parts[0].startswith(".") or "site-packages" in rel.parts:
            continue
        files.append(path)
    return files


def _musubi_options() -> set[str]:
    folder = contract.CONTRACT_ROOT / contract.CONTRACT
    names = set()
    for spec in folder.glob("*.json"):
        for arg in json.loads(spec.read_text(encoding="utf-8"))["args"]:
            names.update(f for f in arg["flags"] if f.startswith("--"))
    return names


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _click_option_names(tree: ast.AST) -> set[int]:
    """String constants that declare musubi-pipe's own command-line options (click.option)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("option", "argument"):
            ids.update(id(a) for a in node.args if isinstance(a, ast.Constant))
    return ids


def spelled_knowledge(root: Path = ROOT) -> list[tuple[str, int, str]]:
    """(file, line, word) for every family name, task name or musubi flag a product file spells."""
    families = {w for fam in registry.families() for w in (fam.name, fam.short, fam.full, *fam.aliases)}
    tasks = registry.all_task_names()
    flags = _musubi_options()
    found = []
    for path in product_files(root):
        rel = path.relative_to(root).as_posix()
        if rel in ALLOWED_FILES:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _docstrings(tree) | _click_option_names(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in skip:
                continue
            word = node.value
            if word in families or word in tasks or word.split("=")[0] in flags:
                found.append((rel, node.lineno, word))
    return found


def test_no_family_task_or_musubi_flag_is_spelled_outside_the_registry():
    found = spelled_knowledge()
    assert not found, "move these into pipelines/ (the registry) and read them from there:\n" + "\n".join(
        f"  {f}:{line}: {word!r}" for f, line, word in found)


def test_the_scan_finds_a_planted_spelling(tmp_path):
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "x.py").write_text('FAMILY = "hv"\nARGS = ["--dataset_config", "x"]\n"""wan in a docstring"""\n')
    words = {w for _, _, w in spelled_knowledge(tmp_path)}
    assert words == {"hv", "--dataset_config"}


@pytest.mark.parametrize("name", registry.family_names())
def test_every_family_file_is_complete(name):
    fam = registry.family(name)
    assert fam.title and fam.short and fam.full and fam.comfy_name and fam.output in ("video", "image")
    assert fam.network_module and fam.lora["key_prefix"] and fam.lora["module_sets"]
    assert (fam.tasks and fam.default_task in fam.tasks) or (not fam.tasks and fam.model is not None)
    for task in fam.tasks.values():
        assert task.name in fam.dits, f"{name}: task {task.name} has no memory facts"
    for kind, stage in fam.stages.items():
        if stage.launcher == "musubi-pipe":
            continue
        options = contract.options(stage.script)  # raises if the script is not in the recorded contract
        for option in {**stage.defaults, **{k: v for d in stage.task_defaults.values() for k, v in d.items()}}:
            if option in ("attention",):  # a language field: the compiler turns it into one flag
                continue
            assert option in options, f"{name}.{kind}: default {option} is not an option of {stage.script}"
        for slot in stage.models:
            assert slot in fam.models, f"{name}.{kind}: model slot {slot} is not in [models]"
            assert fam.models[slot].name in options, f"{name}.{kind}: {stage.script} has no --{slot}"
        for alias, option in stage.aliases.items():
            for one in option if isinstance(option, list) else [option]:  # a list spreads one value over options
                assert one in options, f"{name}.{kind}: alias {alias} -> {one} is not an option of {stage.script}"
        for rung in stage.ladder:
            for option in rung.settings:
                assert option in options, f"{name}.{kind}: ladder option {option} is not an option of {stage.script}"
        for weights, multipliers in stage.loras.values() if kind in ("generate", "merge") else ():
            if weights in options:
                assert multipliers in options
        if "task" in options and options["task"].choices is not None:  # a --task without choices is checked in the script
            choices = set(options["task"].choices)
            assert set(fam.tasks) <= choices, f"{name}.{kind}: tasks not accepted by {stage.script}: {set(fam.tasks) - choices}"


def test_block_swap_maxima_follow_musubis_rule():
    """enable_block_swap: one block kind -> blocks - 1 (Z-Image: blocks - 2, its [memory]
    block_swap_keeps); double/single -> n//2 double and (n - n//2)*2+1 single, each below its count
    (FLUX: at most count - 2; FLUX.2 splits by the blocks' ratio, [memory] block_swap_split)."""
    for fam in registry.families():
        for dit in fam.dits.values():
            if len(dit.blocks) == 1:
                assert dit.max_blocks_to_swap == dit.blocks[0].count - fam.memory.get("block_swap_keeps", 1)
            else:
                double, single = dit.blocks[0].count, dit.blocks[1].count
                keep = fam.memory.get("block_swap_keeps", 1)  # FLUX: each kind keeps 2
                split = _ratio_split if fam.memory.get("block_swap_split") == "ratio" else lambda n, d, s: (n // 2, (n - n // 2) * 2 + 1)
                fits = [n for n in range(1, 200) if all(a <= b - keep for a, b in zip(split(n, double, single), (double, single)))]
                assert dit.max_blocks_to_swap == max(fits), (fam.name, dit.task)


def _ratio_split(n: int, double: int, single: int) -> tuple[int, int]:
    """FLUX.2's Flux2.enable_block_swap: blocks_to_swap split by the single/double ratio, then moved to fit."""
    ratio = single / double
    d = int(round(n / (1.0 + ratio / 2.0)))
    s = int(round(d * ratio))
    if double * 2 < single:
        while d >= 1 and d > double - 2:
            d, s = d - 1, s + 2
    else:
        while s >= 2 and s > single - 2:
            s, d = s - 2, d + 1
    return d, s


def test_aliases_resolve_to_one_family():
    seen = {}
    for fam in registry.families():
        for word in (fam.name, fam.short, fam.full, *fam.aliases):
            assert seen.setdefault(word, fam.name) == fam.name, f"{word} names two families"
            assert registry.family(word).name == fam.name


if __name__ == "__main__":  # python tests/test_registry_design.py [ROOT]: count the spellings
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    hits = spelled_knowledge(root)
    for f, line, word in hits:
        print(f"{f}:{line}: {word}")
    print(f"{len(hits)} spellings in {len({f for f, _, _ in hits})} files")
