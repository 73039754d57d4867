"""Prompt files for musubi's batch generation and training samples, and outputs matched to prompts."""
from __future__ import annotations

import ast
import json
import logging
import os
import re
import time
from pathlib import Path

import pytest

from musubi_pipe.errors import PipelineError
from musubi_pipe.tools import prompts as P

# Tests against a real checkout run only when MUSUBI_TUNER_DIR names one.
MUSUBI_SRC = Path(os.environ["MUSUBI_TUNER_DIR"]) / "src" / "musubi_tuner" if os.environ.get("MUSUBI_TUNER_DIR") else None


def musubi_function(relpath: str, name: str):
    """musubi's own parser function, taken from its source file at test time (its modules import
    torch and friends; these functions only need the standard library)."""
    path = MUSUBI_SRC / relpath if MUSUBI_SRC else None
    if path is None or not path.exists():
        pytest.skip("no musubi-tuner checkout (set MUSUBI_TUNER_DIR)")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"re": re, "json": json, "logger": logging.getLogger("musubi"), "Dict": dict, "Any": object,
                 "List": list, "Optional": object}
    exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
    return namespace[name]


def test_generate_lines_parse_back_exactly_with_wan_parser(tmp_path):
    parse = musubi_function("wan_generate_video.py", "parse_prompt_line")
    prompts = [
        P.Prompt("a cat on a sofa, 4k", seed=42, width=832, height=480, frames=81, steps=20, guidance=5.0,
                 flow_shift=3.0, negative="blurry, low quality"),
        P.Prompt("i love my cat", seed=7, image="/data/start frame.png", end_image="/data/end.png"),
        {"text": "plain", "seed": 1},
    ]
    path = P.write_generate_prompts(prompts, tmp_path / "batch.txt", "wan_generate_video.py")
    lines = path.read_text(encoding="utf-8").splitlines()
    parsed = [parse(line.strip()) for line in lines]
    assert parsed[0] == {"prompt": "a cat on a sofa, 4k", "video_size_width": 832, "video_size_height": 480,
                         "video_length": 81, "seed": 42, "infer_steps": 20, "guidance_scale": 5.0, "flow_shift": 3.0,
                         "negative_prompt": "blurry, low quality"}
    assert parsed[1] == {"prompt": "i love my cat", "seed": 7, "image_path": "/data/start frame.png",
                         "end_image_path": "/data/end.png"}
    assert parsed[2] == {"prompt": "plain", "seed": 1}


def test_framepack_uses_seconds_and_refuses_frames(tmp_path):
    parse = musubi_function("fpack_generate_video.py", "parse_prompt_line")
    line = P.generate_prompt_lines([P.Prompt("run", seed=3, video_seconds=2.5, video_sections=3, image="a.png")],
                                   "fpack_generate_video")[0]
    assert parse(line) == {"prompt": "run", "seed": 3, "video_seconds": 2.5, "video_sections": 3, "image_path": "a.png"}
    with pytest.raises(PipelineError) as info:
        P.generate_prompt_lines([P.Prompt("run", frames=33)], "fpack_generate_video")
    assert "prompts[0].frames" in str(info.value) and "video_seconds" in str(info.value)


def test_script_without_from_file_is_refused():
    with pytest.raises(PipelineError, match="no --from_file"):
        P.generate_prompt_lines([P.Prompt("x")], "hv_generate_video.py")


def test_texts_musubi_would_misread_are_refused_all_at_once():
    bad = [P.Prompt("a dog --w 5 wide"), P.Prompt("  "), P.Prompt("# not a comment"), P.Prompt("two\nlines"),
           P.Prompt("ok", negative="ugly --n worse"), P.Prompt("ok", image=" padded.png"), P.Prompt("ok", seed=-1)]
    with pytest.raises(PipelineError) as info:
        P.generate_prompt_lines(bad, "wan_generate_video")
    paths = [p.path for p in info.value.problems]
    assert paths == ["prompts[0].text", "prompts[1].text", "prompts[2].text", "prompts[3].text",
                     "prompts[4].negative", "prompts[5].image", "prompts[6].seed"]


def test_sample_txt_refuses_texts_the_sample_parser_misreads(tmp_path):
    parse = musubi_function("training/sampling_prompts.py", "line_to_prompt_dict")
    # the trap itself, shown with musubi's own parser
    assert parse("i love my cat")["image_path"] == "love my cat"
    for text in ("i love my cat", "N ice view", "w 512 pixels", "fs 3 sports car"):
        with pytest.raises(PipelineError, match="sample parser misreads"):
            P.write_sample_prompts([P.Prompt(text)], tmp_path / "s.txt")
    path = P.write_sample_prompts([P.Prompt("a knight", seed=5, width=512, height=512, frames=25, steps=20,
                                            cfg_scale=4.0, negative="bad")], tmp_path / "s.txt")
    assert parse(path.read_text(encoding="utf-8").strip()) == {
        "prompt": "a knight", "seed": 5, "width": 512, "height": 512, "frame_count": 25, "sample_steps": 20,
        "cfg_scale": 4.0, "negative_prompt": "bad"}
    assert [p.name for p in tmp_path.iterdir()] == ["s.txt"]  # refused files unwritten, no temporary file left


def test_sample_json_keeps_any_text_and_uses_musubi_keys(tmp_path):
    path = P.write_sample_prompts([P.Prompt("i love my cat -- really", seed=1, frames=9, image="x.png")], tmp_path / "s.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == [{"prompt": "i love my cat -- really", "seed": 1, "frame_count": 9, "image_path": "x.png"}]
    with pytest.raises(PipelineError, match="not .yaml"):
        P.write_sample_prompts([P.Prompt("x")], tmp_path / "s.yaml")


def test_floats_never_use_exponent_notation():
    line = P.generate_prompt_lines([P.Prompt("x", flow_shift=0.00001)], "wan_generate_video")[0]
    assert line == "x --fs 0.00001"


def _touch(folder: Path, stamp: str, seed: int, suffix=".mp4"):
    p = folder / f"{stamp}_{seed}{suffix}"
    p.write_bytes(b"")
    return p


def test_outputs_matched_by_seed_in_order_and_missing_ones_left_empty(tmp_path):
    prompts = [P.Prompt("a", seed=5), P.Prompt("b", seed=5), P.Prompt("c", seed=9), P.Prompt("d", seed=11), P.Prompt("e")]
    _touch(tmp_path, "20260101-100000-100", 5)
    _touch(tmp_path, "20260101-100000-900", 5)
    # prompt c (seed 9) failed: no file
    _touch(tmp_path, "20260101-100001-200", 11)
    _touch(tmp_path, "20260101-100001-200", 11, "_latent.safetensors")  # latents are not outputs
    _touch(tmp_path, "20260101-100002-000", 123)  # e: random seed
    (tmp_path / "notes.txt").write_text("x")
    got = [(m.prompt.text, Path(m.output).name if m.output else None) for m in P.match_outputs(prompts, tmp_path)]
    assert got == [("a", "20260101-100000-100_5.mp4"), ("b", "20260101-100000-900_5.mp4"), ("c", None),
                   ("d", "20260101-100001-200_11.mp4"), ("e", "20260101-100002-000_123.mp4")]


def test_outputs_of_an_earlier_run_are_ignored(tmp_path):
    _touch(tmp_path, "20200101-000000-000", 5)
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now + 5)) + "-000"
    _touch(tmp_path, stamp, 5)
    m = P.match_outputs([P.Prompt("a", seed=5)], tmp_path, since=now)
    assert Path(m[0].output).name == f"{stamp}_5.mp4"


def test_a_picture_saved_as_layers_is_one_output_of_its_prompt(tmp_path):
    """Layered image generation saves <time>_layer<i>_<seed>_000.png per layer: the prompt is
    matched once (layer 0), and output_group gives every layer in layer order (10 after 9)."""
    layers = [_touch(tmp_path, f"20260101-100000-100_layer{i}", 5, "_000.png") for i in (0, 1, 2, 10, 9)]
    _touch(tmp_path, "20260101-100001-000_layer0", 6, "_000.png")
    _touch(tmp_path, "20260101-100001-000_layer1", 6, "_000.png")
    _touch(tmp_path, "20260101-100002-000", 7, "_000.png")  # an ordinary picture
    matched = P.match_outputs([P.Prompt("a", seed=5), P.Prompt("b"), P.Prompt("c", seed=7)], tmp_path)
    assert [Path(m.output).name for m in matched] == ["20260101-100000-100_layer0_5_000.png",
                                                      "20260101-100001-000_layer0_6_000.png", "20260101-100002-000_7_000.png"]
    group = P.output_group(layers[3])  # from any layer
    assert [Path(p).name.split("_")[1] for p in group] == ["layer0", "layer1", "layer2", "layer9", "layer10"]
    assert P.output_group(matched[2].output) == [matched[2].output]
