"""The progress parser reads musubi-tuner's real output (musubi-facts §5) into events."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from musubi_pipe.executors import events as ev
from musubi_pipe.executors.progress import ProgressParser

# Real output of a CPU wan_train_network.py run (musubi-facts §5), as the two streams carry it.
TRAIN_STDOUT = (
    "accelerator device: cpu\nimport network module: networks.lora_wan\nprepare optimizer, data loader etc.\n"
    "override steps. steps for 2 epochs is / 指定エポックまでのステップ数: 4\n"
    "running training / 学習開始\n"
    "  num train items / 学習画像、動画数: 2\n"
    "  num batches per epoch / 1epochのバッチ数: 2\n"
    "  num epochs / epoch数: 2\n"
    "  batch size per device / バッチサイズ: 1\n"
    "  gradient accumulation steps / 勾配を合計するステップ数 = 1\n"
    "  total optimization steps / 学習ステップ数: 4\n"
    "\nepoch 1/2\n"
    "\nsaving checkpoint: out2/ep_lora-step00000001.safetensors\n"
)
TRAIN_STDERR = (
    "INFO:musubi_tuner.training.trainer_base:Loading DiT model from /m/wan2.1_t2v_1.3B_bf16.safetensors\n"
    "\rLoading wan2.1_t2v_1.3B_bf16.safetensors:  37%|███▋      | 309/825 [00:01<00:02, 206.12it/s]"
    "\rLoading wan2.1_t2v_1.3B_bf16.safetensors: 100%|██████████| 825/825 [00:03<00:00, 250.00it/s]\n"
    "\rsteps:   0%|          | 0/4 [00:00<?, ?it/s]"
    "\rsteps:  25%|██▌       | 1/4 [00:00<00:00, 12.81it/s]"
    "\rsteps:  25%|██▌       | 1/4 [00:00<00:00, 12.81it/s, avr_loss=2.67]"
    "\rsteps:  50%|█████     | 2/4 [00:01<00:01,  1.23it/s, avr_loss=2.51]"
    "\rsteps: 100%|██████████| 4/4 [00:03<00:00,  1.20it/s, avr_loss=2.4]\n"
    "INFO:musubi_tuner.training.trainer_base:model saved.\n"
)


def progress(events):
    return [e for e in events if e.kind == ev.PROGRESS]


def feed_all(parser, pieces):
    found = []
    for stream, text in pieces:
        found += parser.feed(stream, text)
    return found + parser.flush()


def test_training_output_gives_phase_steps_epochs_loss_rate():
    p = ProgressParser("train", "train")
    found = feed_all(p, [("stdout", TRAIN_STDOUT[:TRAIN_STDOUT.index("\nepoch")]), ("stderr", TRAIN_STDERR[:TRAIN_STDERR.index("\rsteps:  50%")]),
                         ("stdout", TRAIN_STDOUT[TRAIN_STDOUT.index("\nepoch"):]), ("stderr", TRAIN_STDERR[TRAIN_STDERR.index("\rsteps:  50%"):])])
    prog = progress(found)
    load = [e for e in prog if e.phase == "loading" and e.total == 825]
    assert load[0].current == 309 and load[0].data["what"] == "Loading wan2.1_t2v_1.3B_bf16.safetensors"
    assert next(e for e in prog if e.phase == "training").total is None  # "running training": numbers follow
    planned = next(e for e in prog if e.phase == "training" and e.total)
    assert (planned.current, planned.total, planned.epochs, planned.data["steps_per_epoch"]) == (0, 4, 2, 2)
    step1 = next(e for e in prog if e.current == 1 and e.loss is not None)
    assert (step1.phase, step1.total, step1.loss, step1.rate, step1.eta_s) == ("training", 4, 2.67, 12.81, 0.0)
    epoch = next(e for e in prog if e.epoch == 1)
    assert epoch.epochs == 2 and epoch.phase == "training"
    (out,) = [e for e in found if e.kind == ev.OUTPUT]
    assert out.data == {"name": "checkpoint", "path": "out2/ep_lora-step00000001.safetensors"}
    saving = prog[[i for i, e in enumerate(prog) if e.phase == "saving"][0]]
    assert saving.current == 1 and saving.epoch == 1
    step2 = next(e for e in prog if e.current == 2)
    assert step2.phase == "training" and step2.eta_s == 1.0 and step2.loss == 2.51
    assert prog[-1].phase == "done" and prog[-1].current == 4 and prog[-1].loss == 2.4


def test_steps_per_epoch_counts_gradient_accumulation():
    p = ProgressParser("train", "train")
    found = p.feed("stdout", TRAIN_STDOUT.replace("1epochのバッチ数: 2", "1epochのバッチ数: 10")
                   .replace("勾配を合計するステップ数 = 1", "勾配を合計するステップ数 = 4"))
    planned = next(e for e in progress(found) if e.total)
    assert planned.data["steps_per_epoch"] == 3  # musubi: ceil(10 batches / 4 accumulated)


def test_redraws_without_change_are_not_repeated():
    p = ProgressParser("t", "train")
    bar = "\rsteps:  50%|█████     | 1/2 [00:00<00:00, 12.81it/s, avr_loss=2.67]"
    first = progress(p.feed("stderr", bar))
    assert len(first) == 1
    assert progress(p.feed("stderr", bar.replace("12.81", "12.80"))) == []  # only the rate moved
    assert len(progress(p.feed("stderr", bar.replace("1/2", "2/2").replace("50%", "100%")))) == 1


def test_seconds_per_iteration_and_computed_eta():
    p = ProgressParser("t", "train")
    (e,) = progress(p.feed("stderr", "\rsteps:  25%|██▌       | 1/4 [00:01<00:03,  1.20s/it]"))
    assert e.rate == pytest.approx(1 / 1.2) and e.eta_s == 3.0
    (e,) = progress(p.feed("stderr", "\rsteps:  10%|█         | 10/100 [00:05<?, 2.00it/s]"))
    assert e.eta_s == 45.0  # no remaining time from tqdm: (100 - 10) / 2.00


def test_bar_without_total_while_caching():
    p = ProgressParser("cache", "cache_latents")
    found = feed_all(p, [("stderr", "INFO:__main__:Encoding dataset [0]\n\r0it [00:00, ?it/s]\r1it [00:00,  2.40it/s]"
                                   "\r2it [00:00,  2.42it/s]\r2it [00:00,  2.42it/s]\n")])
    prog = progress(found)
    assert [(e.phase, e.current) for e in prog] == [("caching", None), ("caching", 0), ("caching", 1), ("caching", 2)]
    assert (prog[-1].current, prog[-1].total, prog[-1].rate, prog[-1].eta_s) == (2, None, 2.42, None)
    assert [e.data["text"] for e in found if e.kind == ev.LOG] == ["INFO:__main__:Encoding dataset [0]", "2it [00:00,  2.42it/s]"]


def test_chunks_ending_mid_line_wait_for_the_rest():
    p = ProgressParser("t", "train")
    assert p.feed("stderr", "\rsteps:  50%|█████     | 1/2 [00:0") == []
    (e,) = p.feed("stderr", "0<00:00, 12.81it/s, avr_loss=2.67]")
    assert (e.current, e.loss) == (1, 2.67)  # read without waiting for the next redraw
    assert p.feed("stdout", "\nepo") == []
    (e,) = p.feed("stdout", "ch 2/3\n")[:1]
    assert (e.epoch, e.epochs) == (2, 3)


def test_windows_line_ends_split_between_chunks_make_one_log_line():
    p = ProgressParser("t", "convert")
    found = p.feed("stdout", "INFO:__main__:loading a.safetensors\r") + p.feed("stdout", "\nINFO:__main__:done\r\n")
    assert [e.data["text"] for e in found if e.kind == ev.LOG] == ["INFO:__main__:loading a.safetensors", "INFO:__main__:done"]
    assert progress(found)[0].phase == "loading"


def test_log_line_glued_to_a_bar_is_read_as_its_own_line():
    p = ProgressParser("t", "train")
    found = p.feed("stderr", "\rsteps:  50%|█████     | 2/4 [00:00<00:00, 98.42it/s, avr_loss=0.517]"
                             "INFO:accelerate.accelerator:Saving current state to out/lo-000001-state\n")
    assert [e.data["text"] for e in found if e.kind == ev.LOG] == ["INFO:accelerate.accelerator:Saving current state to out/lo-000001-state"]
    assert progress(found)[0].current == 2


def test_sampling_during_training():
    p = ProgressParser("t", "train")
    p.feed("stderr", "\rsteps:  50%|█████     | 100/200 [01:00<01:00,  1.67it/s, avr_loss=0.1]")
    found = p.feed("stderr", "INFO:musubi_tuner.training.trainer_base:generating sample images at step / サンプル画像生成 ステップ: 100\n"
                             "\r 40%|████      | 8/20 [00:02<00:03,  4.00it/s]")
    prog = progress(found)
    assert prog[0].phase == "sampling"
    assert (prog[-1].phase, prog[-1].current, prog[-1].total) == ("sampling", 8, 20)
    (back,) = progress(p.feed("stderr", "\rsteps:  50%|█████     | 101/200 [01:05<01:00,  1.60it/s, avr_loss=0.1]"))
    assert (back.phase, back.current, back.total) == ("training", 101, 200)


def test_generate_progress_and_output():
    p = ProgressParser("gen", "generate")
    found = feed_all(p, [("stderr", "INFO:__main__:Loading DiT model from /m/dit.safetensors\n"
                                    "\r 40%|████      | 2/5 [00:04<00:06,  2.00s/it]\r100%|██████████| 5/5 [00:10<00:00,  2.00s/it]\n"
                                    "INFO:__main__:Video saved to: out/20260701-101010-123_42.mp4\n")])
    phases = [e.phase for e in progress(found)]
    assert phases == ["loading", "generating", "generating", "saving"]
    assert [e.data for e in found if e.kind == ev.OUTPUT] == [{"name": "file", "path": "out/20260701-101010-123_42.mp4"}]


def test_ema_and_convert_phases():
    p = ProgressParser("ema", "ema")
    found = feed_all(p, [("stdout", "Sorting files by modification time...\nLoading weights from a.safetensors\n"
                                    "Saving merged weights to ema.safetensors\nMerging completed successfully.\n")])
    assert [e.phase for e in progress(found)] == ["loading", "saving", "done"]


def events_of(pieces, kind="train"):
    p = ProgressParser("s", kind)
    found = feed_all(p, pieces)
    return [{k: v for k, v in e.to_dict().items() if k != "time"} for e in found]


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(TRAIN_STDERR)), max_size=40))
def test_any_chunking_of_a_stream_gives_the_same_events(cuts):
    whole = events_of([("stderr", TRAIN_STDERR)])
    bounds = sorted(set(cuts))
    pieces = [("stderr", TRAIN_STDERR[a:b]) for a, b in zip([0] + bounds, bounds + [len(TRAIN_STDERR)])]
    assert events_of(pieces) == whole


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(TRAIN_STDOUT)), max_size=30))
def test_any_chunking_of_stdout_with_windows_line_ends_gives_the_same_events(cuts):
    text = TRAIN_STDOUT.replace("\n", "\r\n")
    whole = events_of([("stdout", text)])
    bounds = sorted(set(cuts))
    pieces = [("stdout", text[a:b]) for a, b in zip([0] + bounds, bounds + [len(text)])]
    assert events_of(pieces) == whole
    assert whole == events_of([("stdout", TRAIN_STDOUT)])  # \r\n reads like \n
