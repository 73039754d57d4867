"""Benchmark: how many events per second the progress parser turns out of a long musubi-style log."""
from __future__ import annotations

import argparse
import time

from musubi_pipe.executors.progress import ProgressParser


def synthetic_log(steps: int, epochs: int = 10) -> list[tuple[str, str]]:
    """(stream, chunk) pieces like a real training run: tqdm redraws, epoch lines, checkpoints."""
    pieces = [("stdout", "running training / 学習開始\n  num batches per epoch / 1epochのバッチ数: %d\n"
                         "  num epochs / epoch数: %d\n  total optimization steps / 学習ステップ数: %d\n"
               % (steps // epochs, epochs, steps))]
    per_epoch = steps // epochs
    for n in range(1, steps + 1):
        if n % per_epoch == 1:
            pieces.append(("stdout", f"\nepoch {n // per_epoch + 1}/{epochs}\n"))
        pct = n * 100 // steps
        bar = "█" * (pct // 10) + " " * (10 - pct // 10)
        line = f"\rsteps: {pct:3d}%|{bar}| {n}/{steps} [00:{n % 60:02d}<01:00,  1.23it/s, avr_loss={0.1 + 1 / n:.3g}]"
        # tqdm writes a redraw, then a second one when the postfix changes; cut mid-line like a pipe might
        pieces.append(("stderr", line[:25]))
        pieces.append(("stderr", line[25:] + line))
        if n % per_epoch == 0:
            pieces.append(("stdout", f"\nsaving checkpoint: out/lora-{n // per_epoch:06d}.safetensors\n"))
            pieces.append(("stderr", "INFO:musubi_tuner.training.trainer_base:some log line\n"))
    return pieces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200_000)
    args = ap.parse_args()
    pieces = synthetic_log(args.steps)
    size = sum(len(c) for _, c in pieces)
    parser = ProgressParser("train", "train")
    start = time.perf_counter()
    events = 0
    for stream, chunk in pieces:
        events += len(parser.feed(stream, chunk))
    events += len(parser.flush())
    elapsed = time.perf_counter() - start
    print(f"chunks: {len(pieces)}  characters: {size / 1e6:.1f} M  events: {events}")
    print(f"time: {elapsed:.2f} s  events/s: {events / elapsed:,.0f}  chunks/s: {len(pieces) / elapsed:,.0f}  "
          f"MB/s: {size / 1e6 / elapsed:.1f}  per chunk: {elapsed / len(pieces) * 1e6:.1f} us")


if __name__ == "__main__":
    main()
