"""The memory-saving ladder in the plan: from the registry's rungs and a step's own argv, each
fallback a whole argv that musubi's recorded parser accepts."""
from __future__ import annotations

from musubi_pipe.compiler import contract
from musubi_pipe.compiler.ladder import fallbacks
from musubi_pipe.pipelines import registry

WAN = registry.family("wan")


def _settings(fbs):
    return [fb.settings for fb in fbs]


def test_wan_training_ladder_in_order_up_to_the_models_block_swap_maximum():
    args = ["--dit", "d.safetensors", "--dataset_config", "d.toml", "--gradient_checkpointing", "--optimizer_type", "adamw8bit",
            "--output_dir", "o", "--output_name", "n"]
    ladder = fallbacks(WAN, "train", "wan_train_network.py", args, "t2v-14B")
    fp8 = {"fp8_base": True, "fp8_scaled": True}
    assert _settings(ladder) == [fp8, {**fp8, "blocks_to_swap": 10}, {**fp8, "blocks_to_swap": 20},
                                 {**fp8, "blocks_to_swap": 30}, {**fp8, "blocks_to_swap": 39}]
    for fb in ladder:
        assert contract.check("wan_train_network.py", fb.args) is None
    assert ladder[-1].args.count("--blocks_to_swap") == 1 and ladder[-1].args[-2:] == ["--blocks_to_swap", "39"]
    small = fallbacks(WAN, "train", "wan_train_network.py", args + ["--blocks_to_swap", "25"], "t2v-1.3B")
    assert _settings(small)[-1] == {**fp8, "blocks_to_swap": 29}


def test_hunyuan_video_training_has_no_fp8_scaled_and_starts_with_checkpointing():
    hv = registry.family("hv")
    ladder = fallbacks(hv, "train", "hv_train_network.py", ["--dit", "d", "--dataset_config", "c"], None)
    assert ladder[0].settings == {"gradient_checkpointing": True}
    assert ladder[1].settings == {"gradient_checkpointing": True, "fp8_base": True}
    assert ladder[-1].settings["blocks_to_swap"] == 38


def test_caching_ladders_lower_numbers_and_turn_switches_on():
    te = fallbacks(WAN, "cache_text_encoder", "wan_cache_text_encoder_outputs.py",
                   ["--dataset_config", "c", "--t5", "t", "--batch_size", "16"], None)
    assert _settings(te) == [{"fp8_t5": True}, {"fp8_t5": True, "batch_size": 1}]
    assert te[-1].args[-2:] == ["--batch_size", "1"] and te[-1].args.count("--batch_size") == 1  # a value, not a switch
    hv = registry.family("hunyuan_video")
    cache = fallbacks(hv, "cache_latents", "cache_latents.py", ["--dataset_config", "c", "--vae", "v", "--vae_chunk_size", "8"], None)
    assert _settings(cache) == [{"vae_tiling": True}, {"vae_tiling": True, "vae_spatial_tile_sample_min_size": 128}]
    assert fallbacks(WAN, "convert", "convert_lora.py", ["--input", "a", "--output", "b", "--target", "other"], None) == []


def test_set_option_replaces_every_spelling_with_its_values():
    script = "wan_generate_video.py"
    assert contract.set_option(script, ["--blocks_to_swap", "10", "--fp8"], "blocks_to_swap", 20) == ["--fp8", "--blocks_to_swap", "20"]
    assert contract.set_option(script, ["--blocks_to_swap=10"], "blocks_to_swap", 20) == ["--blocks_to_swap", "20"]
    words = ["--lora_weight", "a", "b", "--fp8"]
    assert contract.set_option(script, words, "lora_weight", ["c"]) == ["--fp8", "--lora_weight", "c"]
    assert contract.set_option(script, ["--fp8"], "fp8", False) == []


def test_values_of_reads_an_argv_as_musubis_parser_does():
    script = "wan_train_network.py"
    args = ["--dit", "d", "--dataset_config", "c", "--blocks_to_swap=12", "--fp8_base", "--learning_rate", "0.0002"]
    wanted = ["blocks_to_swap", "fp8_base", "fp8_scaled", "learning_rate", "network_dim"]
    parsed = vars(contract.parser(script).parse_args(args))
    assert contract.values_of(script, args, wanted) == {k: parsed[k] for k in wanted}
