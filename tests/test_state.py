"""The lock file beside a pipeline: identities, skip decisions, atomic writes."""
from __future__ import annotations

import json
import os
from pathlib import Path

from musubi_pipe.compiler.plan import Input, Output, Plan, Step
from musubi_pipe.executors.state import (SUCCEEDED, StateFile, dir_identity, file_identity, made_by_plan,
                                         output_files, same_identity, stamp, state_path)


def test_state_file_sits_beside_the_pipeline(tmp_path):
    plan = Plan(name="p", source=str(tmp_path / "my pipeline.toml"), workdir=str(tmp_path / "w"))
    assert state_path(plan) == tmp_path / "my pipeline.musubi-lock.json"


def test_big_files_are_identified_by_size_and_mtime_without_reading(tmp_path):
    big = tmp_path / "dit.safetensors"
    with open(big, "wb") as f:
        f.truncate(3 * 2**30)  # sparse: 3 GiB that costs no disk
    ident = file_identity(big)
    assert ident["size"] == 3 * 2**30 and "sha256" not in ident
    os.utime(big, ns=(ident["mtime_ns"], ident["mtime_ns"] + 1_000_000))
    assert not same_identity(ident, file_identity(big))


def test_small_files_are_hashed_so_rewriting_equal_content_is_no_change(tmp_path):
    f = tmp_path / "dataset.toml"
    f.write_text("a = 1\n")
    before = file_identity(f)
    os.utime(f, ns=(1, 1))
    f.write_text("a = 1\n")
    assert same_identity(before, file_identity(f))
    f.write_text("a = 2\n")
    assert not same_identity(before, file_identity(f))


def test_folder_identity_ignores_what_the_plan_writes_there(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(b"png")
    plan = Plan(name="p", source="", workdir=str(tmp_path), steps=[
        Step(id="c", kind="cache_latents", family="wan", script="wan_cache_latents.py", args=[],
             outputs=[Output("latents", "files", str(imgs), "*_wan.safetensors")])])
    exclude = made_by_plan(plan)
    before = dir_identity(imgs, exclude)
    (imgs / "a_0064x0048_wan.safetensors").write_bytes(b"cache")  # a cache written beside the images
    assert same_identity(before, dir_identity(imgs, exclude))
    (imgs / "b.png").write_bytes(b"png")  # a new image is a change
    assert not same_identity(before, dir_identity(imgs, exclude))


def _step(tmp_path, **kw):
    out = tmp_path / "out.safetensors"
    base = dict(id="s", kind="convert", family="wan", script="convert_lora.py", args=[], fingerprint="f1",
                inputs=[Input("lora", str(tmp_path / "in.safetensors"))], outputs=[Output("lora", "file", str(out))])
    base.update(kw)
    return Step(**base)


def _succeed(state, step):
    from musubi_pipe.executors.state import input_identities

    state.put(step.id, {"status": SUCCEEDED, "fingerprint": step.fingerprint, "inputs": input_identities(step, []),
                        "needs": {n: stamp(state.record(n)) for n in step.needs}, "outputs": output_files(step)})


def test_up_to_date_only_when_settings_inputs_and_outputs_are_unchanged(tmp_path):
    (tmp_path / "in.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "out.safetensors").write_bytes(b"y" * 10)
    state = StateFile(tmp_path / "lock.json")
    step = _step(tmp_path)
    assert state.why_stale(step, [], set()) == "never ran"
    _succeed(state, step)
    assert state.why_stale(step, [], set()) is None
    assert state.why_stale(_step(tmp_path, fingerprint="f2"), [], set()) == "settings changed"
    (tmp_path / "in.safetensors").write_bytes(b"z" * 10)
    assert state.why_stale(step, [], set()).startswith("input changed")
    _succeed(state, step)
    (tmp_path / "out.safetensors").unlink()
    assert state.why_stale(step, [], set()).startswith("output missing")


def test_downstream_is_stale_when_upstream_made_new_outputs(tmp_path):
    (tmp_path / "in.safetensors").write_bytes(b"x")
    (tmp_path / "out.safetensors").write_bytes(b"y")
    (tmp_path / "out2.safetensors").write_bytes(b"z")
    state = StateFile(tmp_path / "lock.json")
    up = _step(tmp_path, id="up")
    down = _step(tmp_path, id="down", needs=["up"], inputs=[],
                 outputs=[Output("lora", "file", str(tmp_path / "out2.safetensors"))])
    _succeed(state, up)
    _succeed(state, down)
    assert state.why_stale(down, [], set()) is None
    assert state.why_stale(down, [], {"up"}) == "up runs first"
    (tmp_path / "out.safetensors").write_bytes(b"new output")
    _succeed(state, up)
    assert state.why_stale(down, [], set()) == "up changed since"


def test_state_is_written_atomically_and_survives_a_reload(tmp_path):
    path = tmp_path / "p.musubi-lock.json"
    state = StateFile(path)
    state.put("train", {"status": "cancelled", "fingerprint": "abc"})
    assert json.loads(path.read_text())["steps"]["train"]["status"] == "cancelled"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    assert StateFile(path).record("train")["fingerprint"] == "abc"


def test_unreadable_state_means_everything_reruns(tmp_path):
    path = tmp_path / "p.musubi-lock.json"
    path.write_text("{not json")
    assert StateFile(path).steps == {}


def test_a_changed_option_that_takes_several_values_is_shown_not_a_crash(tmp_path):
    """nargs options (LoRA lists, sizes) parse to lists: the 'settings changed' reason names them."""
    from musubi_pipe.executors.state import _setting_changes
    from musubi_pipe.pipelines import registry

    fam = next(f for f in registry.families() if f.output == "image")
    script = fam.stages["generate"].script
    args = ["--dit", "d", "--vae", "v", "--text_encoder", "t", "--save_path", "o", "--image_size", "64", "96"]
    step = _step(tmp_path, script=script, args=args[:-2] + ["128", "96"])
    assert _setting_changes(step, args) == ": image_size 64 96 -> 128 96"
