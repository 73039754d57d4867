"""The memory planner reproduces the measured H100 runs and picks the fastest setting that fits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from musubi_pipe.errors import PipelineError
from musubi_pipe.tools import memory
from musubi_pipe.tools.memory import Settings

CLI = Path(memory.__file__).resolve().parents[1] / "pipelines" / "musubi_cli" / "30c658c"
TRAIN_SCRIPT = {"wan": "wan_train_network.py", "hunyuan_video": "hv_train_network.py", "framepack": "fpack_train_network.py"}
CACHE_SCRIPT = {"wan": "wan_cache_latents.py", "hunyuan_video": "cache_latents.py", "framepack": "fpack_cache_latents.py"}


def dests(script: str) -> set[str]:
    return {a["dest"] for a in json.loads((CLI / script.replace(".py", ".json")).read_text())["args"]}


@pytest.mark.parametrize("run", list(memory.measured_runs()))
def test_measured_runs_are_reproduced(run):
    task, gc, fp8, swap, s_it, torch_gib, device_mib = memory.measured_runs()[run]
    got = memory.predict("wan", task, Settings(gc, fp8, swap))
    assert got.torch_peak_gib == pytest.approx(torch_gib, rel=0.03)  # torch peak within 3%
    assert got.device_peak_gib * 1024 == pytest.approx(device_mib, rel=0.04)  # nvidia-smi peak within 4%
    assert got.seconds_per_step == pytest.approx(s_it, rel=0.01)


def test_fitted_constants_are_physical():
    f = memory.fitted()
    assert 40 < f.act_bytes < 120  # bytes of saved activations per token and hidden unit in one block
    assert 0 < f.constant_gib < 2 and 0.5 < f.context_gib < 2
    assert f.checkpointing_factor == pytest.approx(1.397, abs=1e-3) and f.fp8_factor == pytest.approx(1.028, abs=1e-3)
    assert 1e9 < f.swap_bandwidth < 64e9 and 0 <= f.swap_overlap <= 1


def test_80gb_trains_wan_1_3b_without_checkpointing():
    plan = memory.plan_memory("wan", "t2v-1.3B", 80, "832x480", 33)
    assert plan.chosen.settings == Settings(False, False, 0)
    assert plan.train == {}  # nothing to turn on
    assert plan.why["gradient_checkpointing"].startswith("off: the run fits without it")
    assert "1.40x faster" in plan.why["gradient_checkpointing"]


def test_80gb_trains_wan_14b_without_block_swap():
    plan = memory.plan_memory("wan", "t2v-14B", 80, "832x480", 33)
    assert plan.chosen.settings == Settings(True, False, 0)
    assert plan.train == {"gradient_checkpointing": True}
    assert plan.chosen.need_gib < plan.limit_gib


def test_24gb_gets_a_setting_that_fits_and_is_the_fastest_that_does():
    plan = memory.plan_memory("wan", "t2v-14B", 24, "832x480", 33)
    s = plan.chosen.settings
    assert s.gradient_checkpointing and s.fp8 and 0 < s.blocks_to_swap <= 39
    assert plan.chosen.need_gib <= 24 - memory.safety_margin(24)
    assert plan.train == {"gradient_checkpointing": True, "fp8_base": True, "fp8_scaled": True,
                          "blocks_to_swap": s.blocks_to_swap}
    one_less = memory.predict("wan", "t2v-14B", Settings(True, True, s.blocks_to_swap - 1))
    assert one_less.need_gib > plan.limit_gib  # the fewest swapped blocks that fit
    for other in plan.considered:
        assert other.seconds_per_step >= plan.chosen.seconds_per_step
    assert "fewest blocks in CPU memory that fit" in plan.why["blocks_to_swap"]


def test_fp8_is_chosen_over_heavy_swapping_and_explained():
    plan = memory.plan_memory("wan", "t2v-14B", 24)
    assert "faster than the best setting without fp8" in plan.why["fp8_base"]


def test_more_memory_never_makes_training_slower():
    times = [memory.plan_memory("wan", "i2v-14B", v).chosen.seconds_per_step for v in (18, 20, 24, 32, 48, 80)]
    assert times == sorted(times, reverse=True)


def test_bigger_videos_need_more_memory_and_impossible_ones_say_what_to_change():
    small = memory.plan_memory("wan", "t2v-14B", 80, "832x480", 33)
    big = memory.plan_memory("wan", "t2v-14B", 80, "1280x720", 81)
    assert big.tokens > 4 * small.tokens and big.chosen.seconds_per_step > small.chosen.seconds_per_step
    with pytest.raises(PipelineError, match="needs about .* GiB even with gradient checkpointing, fp8 and 39 swapped") as e:
        memory.plan_memory("wan", "t2v-14B", 12, "1280x720", 81)
    assert "lower the resolution or the frame count" in e.value.problems[0].fix


def test_tokens_match_the_measured_latent_shape():
    assert memory.tokens_for(832, 480, 33) == 14_040  # latent 16x9x60x104 with 1x2x2 patches
    assert memory.tokens_for(832, 480, 1) == 1_560


def test_batch_size_turns_on_split_attention():
    plan = memory.plan_memory("framepack", "f1", 80, "640x640", 37, batch_size=2)
    assert plan.train.get("split_attn") is True and plan.tokens == 2 * memory.tokens_for(640, 640, 37)


@pytest.mark.parametrize("family,task", [("wan", "t2v-14B"), ("hunyuan_video", None), ("framepack", "i2v")])
@pytest.mark.parametrize("vram", [16, 24, 80])
def test_fields_are_musubi_argument_names_of_the_family(family, task, vram):
    plan = memory.plan_memory(family, task, vram, "832x480", 33)
    assert set(plan.train) <= dests(TRAIN_SCRIPT[plan.family])
    assert set(plan.cache_latents) <= dests(CACHE_SCRIPT[plan.family])
    if plan.family == "hunyuan_video":
        assert "fp8_scaled" not in plan.train  # HunyuanVideo training has no --fp8_scaled
    assert set(plan.memory_config()) == {"fp8", "fp8_scaled", "blocks_to_swap", "gradient_checkpointing", "split_attn"}
    assert set(plan.why) >= {"gradient_checkpointing", "fp8_base", "blocks_to_swap", "split_attn"}


def test_hunyuan_block_swap_counts_follow_musubi():
    dit = memory.dit_for("hunyuan_video", None)
    assert dit.swapped(20) == (10, 21) and dit.swapped(38) == (19, 39)  # the largest musubi accepts


def test_bad_input_is_reported():
    with pytest.raises(PipelineError, match="wan has no task 't2v-5B'"):
        memory.plan_memory("wan", "t2v-5B", 24)
    with pytest.raises(PipelineError, match="resolution '832' is not WIDTHxHEIGHT"):
        memory.plan_memory("wan", "t2v-14B", 24, "832")
    with pytest.raises(PipelineError, match="GPU memory must be positive"):
        memory.plan_memory("wan", "t2v-14B", 0)


def test_cli_plan_memory():
    from click.testing import CliRunner

    from musubi_pipe.cli import main

    res = CliRunner().invoke(main, ["plan-memory", "--family", "wan", "--task", "t2v-14B", "--vram", "24",
                                    "--resolution", "832x480", "--frames", "33", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["train"] == memory.plan_memory("wan", "t2v-14B", 24).train and data["tokens"] == 14_040
    res = CliRunner().invoke(main, ["plan-memory", "--family", "wan", "--task", "t2v-1.3B", "--vram", "80"])
    assert res.exit_code == 0 and "gradient_checkpointing: off: the run fits without it" in res.output
    res = CliRunner().invoke(main, ["plan-memory", "--family", "wan", "--vram", "8", "--resolution", "1280x720", "--frames", "81"])
    assert res.exit_code == 1 and "lower the resolution or the frame count" in res.output


def test_largest_sample_takes_each_datasets_own_values():
    from musubi_pipe.dsl.dataset import DatasetConfig
    from musubi_pipe.tools.memory import largest_sample

    config = DatasetConfig.model_validate({
        "general": {"resolution": [640, 480], "batch_size": 2},
        "datasets": [
            {"image_directory": "/i", "resolution": 1024},                      # 1 frame, 1024x1024, batch 2
            {"video_directory": "/v", "target_frames": [1, 45]},               # 640x480 x 45 frames, batch 2
            {"video_directory": "/w", "target_frames": [81], "batch_size": 1, "resolution": [320, 240]},
        ]})
    assert largest_sample(config) == {"resolution": (640, 480), "frames": 45, "batch_size": 2}
    assert largest_sample(DatasetConfig.model_validate({"datasets": [{"image_directory": "/i"}]})) == \
        {"resolution": (960, 544), "frames": 1, "batch_size": 1}  # musubi's default resolution
    assert largest_sample(DatasetConfig()) == {}
