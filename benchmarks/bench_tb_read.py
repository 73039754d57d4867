"""Benchmark: read a ~100 MB TensorBoard event file with the monitor's reader, then the
incremental polls that follow (only appended bytes are read); side by side, TensorBoard's own
EventAccumulator reading the same file. Prints figures; asserts nothing.

    python benchmarks/bench_tb_read.py [--mb 100] [--tensorboard-python PYTHON]

--tensorboard-python: a Python that can import tensorboard (no dependency of musubi-pipe); by
default this one, if it can."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from musubi_pipe.tools import monitor as M

TB_READ = r'''
import json, logging, sys, time
logging.disable(logging.WARNING)  # "TensorFlow installation not found"
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

start = time.perf_counter()
acc = EventAccumulator(sys.argv[1], size_guidance={SCALARS: 0})  # 0: keep every scalar
acc.Reload()
rows = sum(len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"])
print(json.dumps({"seconds": time.perf_counter() - start, "rows": rows}))
'''


def build(path: Path, target_mb: float) -> int:
    """Writes records the way musubi logs them (one event per scalar: loss/current, loss/average,
    lr/unet per step). A block of 3,000 steps is framed once and repeated with its bytes unchanged,
    because framing 100 MB with the pure-Python crc32c would take minutes; the reader's work per
    byte is the same."""
    block = bytearray()
    for step in range(1, 3001):
        for tag, value in (("loss/current", 1.0 / step), ("loss/average", 0.5), ("lr/unet", 1e-4)):
            block += M.frame_record(M.encode_event(1_700_000_000.0 + step, step, {tag: value}))
    with open(path, "wb") as f:
        f.write(M.frame_record(M.encode_event(0.0, 0, file_version="brain.Event:2")))
        written = 0
        while written < target_mb * 1e6:
            f.write(block)
            written += len(block)
    return path.stat().st_size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=100.0)
    ap.add_argument("--tensorboard-python", help="a Python with tensorboard for the side-by-side read")
    args = ap.parse_args()
    tb_python = args.tensorboard_python or sys.executable
    if subprocess.run([tb_python, "-c", "import tensorboard"], capture_output=True).returncode != 0:
        if args.tensorboard_python:
            raise SystemExit(f"{tb_python} cannot import tensorboard")
        tb_python = None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.out.tfevents.bench"
        t = time.perf_counter()
        size = build(path, args.mb)
        print(f"built {size / 1e6:.1f} MB in {time.perf_counter() - t:.1f} s")
        reader = M.EventFileReader(path, tags=M.LOSS_TAGS + (M.LR_TAG,))
        t = time.perf_counter()
        rows = reader.read()
        first = time.perf_counter() - t
        print(f"first read: {len(rows):,} scalars from {size / 1e6:.1f} MB in {first:.2f} s "
              f"({size / 1e6 / first:.1f} MB/s)")
        if tb_python is None:
            print("TensorBoard's EventAccumulator: skipped (no Python with tensorboard; give --tensorboard-python)")
        else:
            done = subprocess.run([tb_python, "-c", TB_READ, str(path)], capture_output=True, text=True, check=True)
            tb = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"TensorBoard's EventAccumulator, same file: {tb['rows']:,} scalars in {tb['seconds']:.2f} s "
                  f"({size / 1e6 / tb['seconds']:.1f} MB/s); musubi-pipe / TensorBoard = {first / tb['seconds']:.3f}")
        t = time.perf_counter()
        again = reader.read()
        print(f"poll with nothing new: {len(again)} scalars in {(time.perf_counter() - t) * 1e3:.2f} ms")
        extra = b"".join(M.frame_record(M.encode_event(2e9 + s, 10**6 + s, {"loss/current": 0.1})) for s in range(1000))
        with open(path, "ab") as f:
            f.write(extra)
        t = time.perf_counter()
        new = reader.read()
        print(f"poll after {len(extra) / 1e3:.0f} kB appended: {len(new)} scalars in {(time.perf_counter() - t) * 1e3:.2f} ms")
        status = M.TrainingStatus()
        for wall, step, tag, value in rows[:300_000]:
            status.series.setdefault(tag, M.Series()).add(step, value, wall)
        t = time.perf_counter()
        M.draw_chart(status)
        print(f"chart of {len(status.series['loss/current'].values):,} loss points: {(time.perf_counter() - t) * 1e3:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
