"""Training monitor: TensorBoard event files read incrementally, events.jsonl, smoothing, ETA, samples, chart."""
from __future__ import annotations

import json
import struct

import pytest

from musubi_pipe.executors.events import Event
from musubi_pipe.tools import monitor as M


def test_crc32c_known_values():
    # RFC 3720 test vector and the empty string
    assert M.crc32c(b"123456789") == 0xE3069283
    assert M.crc32c(bytes(32)) == 0x8A9136AA
    assert M.crc32c(b"") == 0


def test_event_roundtrip_through_own_writer_and_reader(tmp_path):
    path = tmp_path / "logs" / "events.out.tfevents.1.host"
    w = M.EventFileWriter(path)
    for step in range(1, 6):
        w.add_scalars(step, {"loss/current": 1.0 / step, "lr/unet": 1e-4 * step}, wall_time=1000.0 + step)
    w.close()
    rows = M.EventFileReader(path).read()
    loss = [(s, v) for _, s, t, v in rows if t == "loss/current"]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5]
    assert loss[2][1] == pytest.approx(1 / 3, rel=1e-6)
    assert [wall for wall, s, t, _ in rows if t == "lr/unet"] == [1001.0, 1002.0, 1003.0, 1004.0, 1005.0]


def test_incremental_read_returns_only_new_events_and_waits_for_partial_records(tmp_path):
    path = tmp_path / "events.out.tfevents.2"
    w = M.EventFileWriter(path)
    w.add_scalars(1, {"loss/current": 0.5})
    w.flush()
    r = M.EventFileReader(path)
    assert [(s, v) for _, s, _, v in r.read()] == [(1, 0.5)]
    assert r.read() == []
    # half a record on disk, as while musubi is writing it
    rec = M.frame_record(M.encode_event(5.0, 2, {"loss/current": 0.25}))
    with open(path, "ab") as f:
        f.write(rec[:10])
    assert r.read() == []
    with open(path, "ab") as f:
        f.write(rec[10:])
    assert [(s, v) for _, s, _, v in r.read()] == [(2, 0.25)]
    assert r.offset == path.stat().st_size


def test_damaged_header_stops_with_a_message(tmp_path):
    path = tmp_path / "events.out.tfevents.3"
    data = M.frame_record(M.encode_event(1.0, 1, {"loss/current": 1.0}))
    path.write_bytes(data + b"\x05" * 16)
    r = M.EventFileReader(path)
    assert len(r.read()) == 1
    assert "damaged record header" in r.corrupt


def test_data_crc_checked_on_request(tmp_path):
    path = tmp_path / "events.out.tfevents.4"
    rec = bytearray(M.frame_record(M.encode_event(1.0, 1, {"loss/current": 1.0})))
    rec[20] ^= 0xFF
    path.write_bytes(bytes(rec))
    r = M.EventFileReader(path, check_data_crc=True)
    assert r.read() == [] and "damaged record data" in r.corrupt


def test_tensor_scalars_are_decoded():
    # a TF2-style summary value: tensor {dtype: DT_FLOAT, tensor_content: <f>}
    tensor = b"\x08\x01" + b"\x22\x04" + struct.pack("<f", 2.5)
    value = b"\x0a\x0closs/current" + b"\x42" + bytes([len(tensor)]) + tensor
    summary = b"\x0a" + bytes([len(value)]) + value
    event = b"\x09" + struct.pack("<d", 3.0) + b"\x10\x07" + b"\x2a" + bytes([len(summary)]) + summary
    assert M.decode_event(event) == (3.0, 7, [("loss/current", 2.5)])


def test_smoothing_matches_tensorboard_definition():
    assert M.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no pull towards 0
    out = M.smooth([1.0, 0.0], weight=0.5)
    assert out == pytest.approx([1.0, (0.5 * 0.5) / (1 - 0.25)])
    assert M.smooth([1.0, float("nan"), 1.0])[1] != M.smooth([1.0, float("nan"), 1.0])[1]  # NaN passes through


def test_monitor_reads_run_folder_events_tensorboard_and_samples(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    out_dir = tmp_path / "out"
    events = [
        Event("step_start", step="train", time=100.0, data={"argv": ["python", "x.py", "--output_dir", str(out_dir)], "output_dir": str(out_dir)}),
        Event("progress", step="train", time=101.0, phase="training", current=10, total=100, epoch=1, epochs=4, loss=0.3, rate=2.0),
    ]
    (run / "events.jsonl").write_text("".join(json.dumps(e.to_dict()) + "\n" for e in events), encoding="utf-8")
    w = M.EventFileWriter(run / "logs" / "20260101120000" / "network_train" / "events.out.tfevents.9.host")
    for s in range(1, 21):
        w.add_scalars(s, {"loss/current": 1.0 - s / 40, "loss/average": 0.9, "lr/unet": 1e-4}, wall_time=1000.0 + s)
    w.close()
    (out_dir / "sample").mkdir(parents=True)
    (out_dir / "sample" / "mylora_000010_00_20260101120500_42.mp4").write_bytes(b"")
    (out_dir / "sample" / "mylora_e000001_01_20260101120600.png").write_bytes(b"")
    (out_dir / "sample" / "notes.txt").write_bytes(b"")
    mon = M.TrainingMonitor(run)
    st = mon.poll()
    assert st.total == 100 and st.epoch == 1 and st.epochs == 4
    assert st.current == 20  # TensorBoard is ahead of the last progress event
    assert st.eta_s == pytest.approx((100 - 20) / 2.0)
    assert st.series["loss/current"].steps == list(range(1, 21))
    assert [(s.step, s.epoch, s.seed) for s in st.samples] == [(10, None, 42), (None, 1, None)]
    # appended later: only new data is read
    with open(run / "events.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(Event("run_end", time=200.0, data={"status": "succeeded"}).to_dict()) + "\n")
        f.write('{"kind": "progress", "curr')  # a line still being written
    st = mon.poll()
    assert st.finished == "succeeded" and len(st.series["loss/current"].values) == 20
    d = st.to_dict()
    assert d["lr"] == pytest.approx(1e-4) and d["points"]["loss/current"] == 20
    assert "step 20/100" in st.summary_line()


def test_monitor_on_log_folder_only_and_missing_path(tmp_path):
    w = M.EventFileWriter(tmp_path / "events.out.tfevents.1")
    w.add_scalars(3, {"loss/current": 0.7, "loss/epoch": 0.6})
    w.close()
    st = M.TrainingMonitor(tmp_path).poll()
    assert st.series["loss/epoch"].values == pytest.approx([0.6])
    with pytest.raises(FileNotFoundError, match="run folder"):
        M.TrainingMonitor(tmp_path / "nope")


def test_chart_draws_loss_and_lr(tmp_path):
    st = M.TrainingStatus()
    for s in range(1, 200):
        st.series.setdefault("loss/current", M.Series()).add(s, 1.0 / s ** 0.3, float(s))
        st.series.setdefault(M.LR_TAG, M.Series()).add(s, 1e-4 * min(1, s / 50), float(s))
    img = M.draw_chart(st, 640, 320)
    assert img.size == (640, 320)
    import numpy as np

    px = np.asarray(img).astype(int)
    blue = (px[..., 2] > 140) & (px[..., 0] < 60)  # smoothed loss line
    orange = (px[..., 0] > 180) & (px[..., 1] > 60) & (px[..., 1] < 120) & (px[..., 2] < 60)  # lr line
    assert blue.sum() > 200 and orange.sum() > 100
    empty = np.asarray(M.draw_chart(M.TrainingStatus(), 200, 100))
    assert not ((empty[..., 2] > 140) & (empty[..., 0] < 60)).any()


def test_cross_check_with_tensorboard_package(tmp_path):
    tb = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    path = tmp_path / "events.out.tfevents.5"
    w = M.EventFileWriter(path)
    for s in range(1, 4):
        w.add_scalars(s, {"loss/current": s * 0.5}, wall_time=10.0 + s)
    w.close()
    theirs = []
    for ev in tb.LegacyEventFileLoader(str(path)).Load():
        for v in ev.summary.value:
            theirs.append((ev.step, v.tag, v.simple_value))
    ours = [(s, t, v) for _, s, t, v in M.EventFileReader(path).read()]
    assert ours == theirs and len(ours) == 3


def test_reads_files_written_by_torch_style_writer(tmp_path):
    """Files written by tensorboard's own writer (the format accelerate's tracker produces)."""
    writer_mod = pytest.importorskip("tensorboard.summary.writer.event_file_writer")
    summary_pb2 = pytest.importorskip("tensorboard.compat.proto.summary_pb2")
    event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
    w = writer_mod.EventFileWriter(str(tmp_path))
    for s in (1, 2):
        summ = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="lr/unet", simple_value=0.001 * s)])
        w.add_event(event_pb2.Event(wall_time=5.0, step=s, summary=summ))
    w.close()
    st = M.TrainingMonitor(tmp_path).poll()
    assert st.series["lr/unet"].values == pytest.approx([0.001, 0.002])


def test_fast_and_general_decoders_agree():
    one = M.encode_event(12.5, 300, {"loss/current": 0.125})
    assert M._decode_simple(one) == (12.5, 300, "loss/current", 0.125)
    two = M.encode_event(12.5, 300, {"loss/current": 0.125, "lr/unet": 0.5})
    assert M._decode_simple(two) is None  # not the single-scalar layout: the general decoder runs
    assert M.decode_event(two) == (12.5, 300, [("loss/current", 0.125), ("lr/unet", 0.5)])
    assert M.decode_event(two, frozenset({"lr/unet"})) == (12.5, 300, [("lr/unet", 0.5)])


@pytest.mark.parametrize("chunk", [7, 64, 1000, 8 << 20])
def test_reading_in_place_gives_what_decoding_each_record_gives(tmp_path, chunk):
    # Single-scalar records (read in place) between others: multi-scalar ones, the file_version
    # record, steps needing 1 to 10 varint bytes, a negative step, a non-ASCII tag, records cut
    # by every block boundary; each way of reading must give the same rows.
    events = [M.encode_event(0.0, 0, file_version="brain.Event:2")]
    for i, step in enumerate([1, 127, 128, 300, 16383, 16384, 2 ** 21 + 5, 2 ** 40, -3, 7]):
        events.append(M.encode_event(100.0 + i, step, {"loss/current": 1.0 / (i + 1)}))
        events.append(M.encode_event(100.5 + i, step, {"lr/unet": 1e-4 * i, "loss/average": 0.5}))
        events.append(M.encode_event(101.0 + i, step, {"élan/x": float(i), "loss/epoch": -1.0}))
        events.append(M.encode_event(101.5 + i, step, {"lr/unet": 2e-4}))
    path = tmp_path / "events.out.tfevents.9"
    path.write_bytes(b"".join(M.frame_record(e) for e in events))
    for tags in (None, M.LOSS_TAGS + (M.LR_TAG,), ("élan/x",)):
        expected = []
        for e in events:
            wall, step, values = M.decode_event(e, frozenset(tags) if tags else None)
            expected += [(wall, step, tag, value) for tag, value in values]
        assert M.EventFileReader(path, tags=tags, chunk=chunk).read() == expected
    assert sum(M._decode_simple(e) is not None for e in events) == 20  # both paths were taken
    assert (108.0, -3, "loss/current", pytest.approx(1 / 9)) in M.EventFileReader(path).read()


def test_cli_monitor_writes_chart_and_json(tmp_path):
    from click.testing import CliRunner

    from musubi_pipe.cli import main

    w = M.EventFileWriter(tmp_path / "logs" / "events.out.tfevents.7")
    for s in range(1, 30):
        w.add_scalars(s, {"loss/current": 1.0 / s})
    w.close()
    res = CliRunner().invoke(main, ["monitor", str(tmp_path), "--json", "--png", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[0])["points"]["loss/current"] == 29
    from PIL import Image

    assert Image.open(tmp_path / "c.png").size == (800, 400)


def _run_folder(root, name, end="succeeded"):
    """A run folder with a training step (epochs, TensorBoard) and a preview step (inference steps)."""
    run = root / "runs" / name
    run.mkdir(parents=True)
    events = [
        Event("plan", data={"steps": ["train", "preview"]}),
        Event("step_start", step="train", time=100.0, data={"kind": "train", "argv": ["python", "t.py"]}),
        Event("progress", step="train", time=101.0, phase="training", current=50, total=100, epoch=2, epochs=4, loss=0.3),
        Event("step_end", step="train", data={"status": "succeeded"}),
        Event("step_start", step="preview", time=150.0, data={"kind": "generate", "argv": ["python", "g.py"]}),
        Event("progress", step="preview", time=151.0, phase="generating", current=20, total=20),
    ]
    if end:
        events += [Event("step_end", step="preview", data={"status": "succeeded"}), Event("run_end", data={"status": end})]
    (run / "events.jsonl").write_text("".join(json.dumps(e.to_dict()) + "\n" for e in events), encoding="utf-8")
    w = M.EventFileWriter(run / "logs" / "events.out.tfevents.1")
    for s in range(1, 11):
        w.add_scalars(s, {"loss/current": 1.0 / s})
    w.close()
    return run


def test_each_step_of_a_run_is_shown_on_its_own(tmp_path):
    run = _run_folder(tmp_path, "20260101-120000")
    train = M.TrainingMonitor(run, step="train").poll()
    assert (train.current, train.total, train.epoch, train.epochs) == (50, 100, 2, 4)
    assert len(train.series["loss/current"].values) == 10
    preview = M.TrainingMonitor(run, step="preview").poll()
    # the preview's 20 inference steps, never the training's epochs, losses or samples
    assert (preview.current, preview.total, preview.epoch) == (20, 20, None)
    assert not preview.series and "epoch" not in preview.summary_line() and "samples" not in preview.summary_line()
    steps, ended = M.run_steps(run)
    assert [(s.id, s.kind, s.status) for s in steps] == [("train", "train", "succeeded"), ("preview", "generate", "succeeded")]
    assert ended == "succeeded" and M.current_step(steps).id == "train"
    running = _run_folder(tmp_path / "b", "x", end="")
    assert M.current_step(M.run_steps(running)[0]).id == "preview"


def test_cli_monitor_shows_one_step_and_finds_runs_in_a_workdir(tmp_path):
    from click.testing import CliRunner

    from musubi_pipe.cli import main

    old = _run_folder(tmp_path, "20260101-100000", end="failed")
    new = _run_folder(tmp_path, "20260102-100000")
    res = CliRunner().invoke(main, ["monitor", str(tmp_path)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(f"{new}: step train (train); other steps: preview (generate, succeeded)")
    assert lines[1].startswith("train: training, step 50/100, epoch 2/4") and "20/20" not in res.output
    res = CliRunner().invoke(main, ["monitor", str(new), "--step", "preview", "--json"])
    data = json.loads(res.output)
    assert res.exit_code == 0 and data["step"] == "preview" and data["total"] == 20 and data["epochs"] is None
    res = CliRunner().invoke(main, ["monitor", str(tmp_path), "--list"])
    assert res.exit_code == 0 and [line.split()[:2] for line in res.output.splitlines()] == [[str(old), "failed"], [str(new), "succeeded"]]
    res = CliRunner().invoke(main, ["monitor", str(new), "--step", "nope"])
    assert res.exit_code == 1 and "no step 'nope'" in res.output and "train, preview" in res.output


def test_cli_monitor_on_a_folder_without_a_run_is_an_error(tmp_path):
    from click.testing import CliRunner

    from musubi_pipe.cli import main

    (tmp_path / "runs").mkdir()
    res = CliRunner().invoke(main, ["monitor", str(tmp_path)])
    assert res.exit_code == 1 and "no run here" in res.output and "events.jsonl" in res.output
    assert "samples" not in res.output
    res = CliRunner().invoke(main, ["monitor", str(tmp_path), "--list"])
    assert res.exit_code == 1 and "no runs" in res.output


def test_a_training_step_reads_its_own_logging_dir_from_this_run_only(tmp_path):
    import os

    from musubi_pipe.pipelines.registry import option

    logs = tmp_path / "logs"
    for name, loss, mtime in (("old", 9.0, 1000.0), ("new", 0.5, 5000.0)):
        w = M.EventFileWriter(logs / name / "events.out.tfevents.1")
        w.add_scalars(1, {"loss/current": loss})
        w.close()
        os.utime(logs / name / "events.out.tfevents.1", (mtime, mtime))
    run = tmp_path / "run"
    run.mkdir()
    start = Event("step_start", step="train", time=4000.0, data={"kind": "train", "argv": ["x.py", option("logging_dir"), str(logs)]})
    (run / "events.jsonl").write_text(json.dumps(start.to_dict()) + "\n", encoding="utf-8")
    st = M.TrainingMonitor(run, step="train").poll()
    assert st.series["loss/current"].values == [0.5]  # the earlier run's log in the same folder is not this step's
