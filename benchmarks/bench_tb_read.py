"""Benchmark: read a ~100 MB TensorBoard event file with the monitor's reader, then the
incremental polls that follow (only appended bytes are read). Prints figures; asserts nothing."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from musubi_pipe.tools import monitor as M


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
    args = ap.parse_args()
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
