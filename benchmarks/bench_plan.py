"""Benchmark: `musubi-pipe plan` on a generated 200-stage pipeline, and the package import;
compile of 1000 stages in process, with the share of musubi's argparse re-check in it.
Targets (issue 2): plan under 0.5 s, import under 0.2 s, torch never imported; (issue 12): 1000
stages under 0.3 s in process.
Run: python benchmarks/bench_plan.py [--trains 66] [--big-trains 333]"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def pipeline_text(trains: int) -> str:
    parts = ['name = "bench"', 'family = "wan"', 'task = "t2v-1.3B"', "[models]",
             'dit = "/m/wan2.1_t2v_1.3B_bf16.safetensors"', 'vae = "/m/vae.safetensors"', 't5 = "/m/t5.pth"',
             "[dataset]", 'datasets = [{ video_directory = "/data/clips", target_frames = [1, 25] }]',
             '[stages.latents]\nkind = "cache_latents"', '[stages.text]\nkind = "cache_text_encoder"']
    for i in range(trains):
        parts.append(f'[stages.train{i}]\nkind = "train"\nnetwork_dim = {4 + i % 64}\nmax_train_epochs = 8\nsave_every_n_epochs = 2')
        parts.append(f'[stages.gen{i}]\nkind = "generate"\nprompt = "prompt {i}"\nloras = ["@train{i}.lora"]')
        parts.append(f'[stages.ema{i}]\nkind = "ema"\ncheckpoints = "@train{i}.checkpoints"\nbeta = 0.9')
    return "\n".join(parts) + "\n"


def timed(argv: list[str], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def in_process_with_check_share(path: Path, repeat: int = 3) -> tuple[float, float, int]:
    """(median seconds of compile_file, share of it spent in contract.check, steps)."""
    from musubi_pipe.compiler import compile_file, contract

    check, spent = contract.check, [0.0]

    def timed_check(*a):
        start = time.perf_counter()
        try:
            return check(*a)
        finally:
            spent[0] += time.perf_counter() - start

    steps = len(compile_file(path).steps)
    times, shares = [], []
    contract.check = timed_check
    try:
        for _ in range(repeat):
            spent[0] = 0.0
            start = time.perf_counter()
            compile_file(path)
            times.append(time.perf_counter() - start)
            shares.append(spent[0] / times[-1])
    finally:
        contract.check = check
    return statistics.median(times), statistics.median(shares), steps


def main() -> None:
    from musubi_pipe.compiler import compile_file

    ap = argparse.ArgumentParser()
    ap.add_argument("--trains", type=int, default=66, help="train/generate/ema triples of the CLI pipeline")
    ap.add_argument("--big-trains", type=int, default=333, help="triples of the in-process pipeline")
    args = ap.parse_args()
    stages = 2 + 3 * args.trains
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.toml"
        path.write_text(pipeline_text(args.trains))  # 2 cache stages + 66 x (train, generate, ema) = 200 stages
        plan = compile_file(path)
        assert len(plan.steps) == stages, len(plan.steps)
        big = Path(tmp) / "big.toml"
        big.write_text(pipeline_text(args.big_trains))
        big_seconds, big_share, big_steps = in_process_with_check_share(big)
        in_process = []
        for _ in range(5):
            start = time.perf_counter()
            compile_file(path)
            in_process.append(time.perf_counter() - start)
        python = sys.executable
        cli = timed([python, "-m", "musubi_pipe.cli", "plan", "--format", "json", str(path)], 5)
        baseline = timed([python, "-c", "pass"], 5)
        imports = timed([python, "-c", "import musubi_pipe.cli"], 5)
        torch = subprocess.run([python, "-c", "import sys, musubi_pipe.cli, musubi_pipe.compiler, musubi_pipe.comfy_adapter;"
                                "from musubi_pipe.compiler import compile_file; print('torch' in sys.modules)"],
                               capture_output=True, text=True, check=True).stdout.strip()
    med = statistics.median
    print(f"compile {stages} stages in process:      {med(in_process) * 1000:7.1f} ms (median of 5)")
    print(f"compile {big_steps} stages in process:     {big_seconds * 1000:7.1f} ms (median of 3), "
          f"{big_share:.0%} of it musubi's argparse re-check")
    print(f"`musubi-pipe plan` {stages} stages (CLI): {med(cli) * 1000:7.1f} ms, of which Python start {med(baseline) * 1000:.1f} ms")
    print(f"import musubi_pipe.cli:              {(med(imports) - med(baseline)) * 1000:7.1f} ms (above a bare interpreter)")
    print(f"torch imported:                      {torch}")


if __name__ == "__main__":
    main()
