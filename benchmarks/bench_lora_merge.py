"""Benchmark: merge two rank-32 LoRAs of Wan 2.1 14B's full module list (40 blocks x 10 modules,
dim 5120, ffn 13824), exact and re-factorised by SVD to rank 32; seconds and peak RSS per case.

    python benchmarks/bench_lora_merge.py [--dtype float32|bfloat16|both] [--workdir DIR] [--keep]

Each merge runs in a fresh child process so its peak RSS is its own."""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_input(path: Path, dtype: str, seed: int) -> None:
    import numpy as np

    from musubi_pipe.tools.lora import _OUT_DTYPES, target_modules, write_safetensors

    modules = list(target_modules("wan", "t2v-14B").values())
    st = _OUT_DTYPES[dtype]
    entries = []
    for m in modules:
        entries += [(f"{m.lora_name}.lora_down.weight", st, (32, m.in_features)),
                    (f"{m.lora_name}.lora_up.weight", st, (m.out_features, 32)), (f"{m.lora_name}.alpha", st, ())]
    rng = np.random.default_rng(seed)

    def arrays():
        for m in modules:
            yield rng.standard_normal((32, m.in_features), dtype=np.float32) * 0.01
            yield rng.standard_normal((m.out_features, 32), dtype=np.float32) * 0.01
            yield np.array(16.0, dtype=np.float32)

    write_safetensors(path, entries, arrays(), {"modelspec.architecture": "wan2.1/lora"}, force=True)


def child(mode: str, a: str, b: str, out: str) -> None:
    from musubi_pipe.tools.lora import merge_loras

    start = time.perf_counter()
    res = merge_loras(out, [(a, 0.6), (b, 0.4)], rank=32 if mode == "svd" else None, force=True)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_kib / 1024, "total_error": res.total_error,
                      "output_mib": os.path.getsize(out) / 2 ** 20}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "A", "B", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-lora-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"Wan 14B module list: 400 modules, rank 32 each; work folder {work}")
    try:
        for dtype in (["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]):
            paths = [work / f"{dtype}-{i}.safetensors" for i in (1, 2)]
            start = time.perf_counter()
            for i, p in enumerate(paths):
                make_input(p, dtype, seed=i)
            size = paths[0].stat().st_size / 2 ** 20
            print(f"[{dtype}] inputs: 2 x {size:.0f} MiB, made in {time.perf_counter() - start:.1f} s")
            for mode in ("exact", "svd"):
                out = work / f"{dtype}-{mode}.safetensors"
                done = subprocess.run([sys.executable, __file__, "--child", mode, str(paths[0]), str(paths[1]), str(out)],
                                      capture_output=True, text=True, check=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                label = "exact (rank 64)" if mode == "exact" else "SVD to rank 32"
                print(f"[{dtype}] {label:16s} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                      f"output {r['output_mib']:5.0f} MiB  relative error {r['total_error']:.3%}")
                out.unlink()
            for p in paths:
                p.unlink()
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
