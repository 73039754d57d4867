"""Benchmark: merge two rank-32 LoRAs of Wan 2.1 14B's full module list (40 blocks x 10 modules,
dim 5120, ffn 13824), exact and re-factorised by SVD to rank 32; seconds and peak RSS per case.
Side by side: a plain torch SVD merge (each module's full delta, torch.linalg.svd, truncated; what
sd-scripts' svd_merge_lora.py does), on the first few modules of the float32 case (a full SVD of a
5120 x 5120 matrix takes 10 s to 100 s on a 2-core machine), with the time per module and the
error on the same modules.

    python benchmarks/bench_lora_merge.py [--dtype float32|bfloat16|both] [--modules N]
        [--torch-python PYTHON] [--torch-modules M] [--workdir DIR] [--keep]

--torch-python: a Python that can import torch and safetensors (torch is no dependency of
musubi-pipe); by default this one, if it can. Each merge runs in a fresh child process so its peak
RSS is its own."""
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

WEIGHTS = (0.6, 0.4)

TORCH_MERGE = r'''
import json, sys, time
import torch
from safetensors import safe_open

a, b, rank, names = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
weights = json.loads(sys.argv[5])
files = [safe_open(a, "pt"), safe_open(b, "pt")]


def delta(f, name, weight):
    down = f.get_tensor(name + ".lora_down.weight").float()
    up = f.get_tensor(name + ".lora_up.weight").float()
    return (up @ down) * (weight * f.get_tensor(name + ".alpha").float().item() / down.shape[0])


errors = []
start = time.perf_counter()
for name in names:
    d = delta(files[0], name, weights[0]) + delta(files[1], name, weights[1])
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    root = s[:rank].sqrt()
    up, down = (u[:, :rank] * root).contiguous(), (root[:, None] * vh[:rank]).contiguous()
    errors.append(float((s[rank:].square().sum() / s.square().sum()).sqrt()))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "errors": errors, "threads": torch.get_num_threads(), "torch": torch.__version__}))
'''


def modules(count: int | None):
    from musubi_pipe.tools.lora import target_modules

    return list(target_modules("wan", "t2v-14B").values())[:count]


def make_input(path: Path, dtype: str, seed: int, count: int | None = None) -> None:
    import numpy as np

    from musubi_pipe.tools.lora import _OUT_DTYPES, write_safetensors

    mods = modules(count)
    st = _OUT_DTYPES[dtype]
    entries = []
    for m in mods:
        entries += [(f"{m.lora_name}.lora_down.weight", st, (32, m.in_features)),
                    (f"{m.lora_name}.lora_up.weight", st, (m.out_features, 32)), (f"{m.lora_name}.alpha", st, ())]
    rng = np.random.default_rng(seed)

    def arrays():
        for m in mods:
            yield rng.standard_normal((32, m.in_features), dtype=np.float32) * 0.01
            yield rng.standard_normal((m.out_features, 32), dtype=np.float32) * 0.01
            yield np.array(16.0, dtype=np.float32)

    write_safetensors(path, entries, arrays(), {"modelspec.architecture": "wan2.1/lora"}, force=True)


def child(mode: str, a: str, b: str, out: str) -> None:
    from musubi_pipe.tools.lora import merge_loras

    start = time.perf_counter()
    res = merge_loras(out, [(a, WEIGHTS[0]), (b, WEIGHTS[1])], rank=32 if mode == "svd" else None, force=True)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_kib / 1024, "total_error": res.total_error,
                      "output_mib": os.path.getsize(out) / 2 ** 20, "errors": [m.error for m in res.modules]}))


def torch_python(asked: str | None) -> str | None:
    python = asked or sys.executable
    ok = subprocess.run([python, "-c", "import torch, safetensors"], capture_output=True).returncode == 0
    if asked and not ok:
        raise SystemExit(f"{asked} cannot import torch and safetensors")
    return python if ok else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    ap.add_argument("--modules", type=int, default=None, help="only the first N of the 400 modules (a smoke run)")
    ap.add_argument("--torch-python", help="a Python with torch and safetensors for the side-by-side merge")
    ap.add_argument("--torch-modules", type=int, default=2, help="modules the torch merge does, float32 only (0: none)")
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "A", "B", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    mods = modules(args.modules)
    torch_py = torch_python(args.torch_python) if args.torch_modules else None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-lora-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"Wan 14B module list: {len(mods)} modules, rank 32 each; {os.cpu_count()} CPUs; work folder {work}")
    try:
        for dtype in (["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]):
            paths = [work / f"{dtype}-{i}.safetensors" for i in (1, 2)]
            start = time.perf_counter()
            for i, p in enumerate(paths):
                make_input(p, dtype, seed=i, count=args.modules)
            size = paths[0].stat().st_size / 2 ** 20
            print(f"[{dtype}] inputs: 2 x {size:.0f} MiB, made in {time.perf_counter() - start:.1f} s")
            ours = {}
            for mode in ("exact", "svd"):
                out = work / f"{dtype}-{mode}.safetensors"
                done = subprocess.run([sys.executable, __file__, "--child", mode, str(paths[0]), str(paths[1]), str(out)],
                                      capture_output=True, text=True, check=True)
                r = ours[mode] = json.loads(done.stdout.strip().splitlines()[-1])
                label = "exact (rank 64)" if mode == "exact" else "SVD to rank 32"
                print(f"[{dtype}] {label:16s} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                      f"output {r['output_mib']:5.0f} MiB  relative error {r['total_error']:.3%}")
                out.unlink()
            if dtype != "float32" or not args.torch_modules:
                pass
            elif torch_py is None:
                print(f"[{dtype}] plain torch SVD merge: skipped (no Python with torch; give --torch-python)")
            else:
                side_by_side(torch_py, paths, mods[:args.torch_modules], ours["svd"], len(mods), dtype)
            for p in paths:
                p.unlink()
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def side_by_side(python: str, paths: list[Path], mods, ours: dict, total: int, dtype: str) -> None:
    names = [m.lora_name for m in mods]
    done = subprocess.run([python, "-c", TORCH_MERGE, str(paths[0]), str(paths[1]), "32", json.dumps(names),
                           json.dumps(WEIGHTS)], capture_output=True, text=True, check=True)
    t = json.loads(done.stdout.strip().splitlines()[-1])
    per_torch = t["seconds"] / len(names)
    per_ours = ours["seconds"] / total  # reading, merging and writing the whole file, per module
    worst = max(abs(a - b) for a, b in zip(ours["errors"], t["errors"]))
    print(f"[{dtype}] plain torch SVD merge (torch {t['torch']}, {t['threads']} threads), first {len(names)} modules: "
          f"{per_torch * 1000:8.1f} ms per module (merge only, nothing written), about {per_torch * total:.0f} s "
          f"for all {total}")
    print(f"[{dtype}] musubi-pipe SVD merge: {per_ours * 1000:8.1f} ms per module (read, merge, write); "
          f"musubi-pipe / torch = {per_ours / per_torch:.4f}; largest difference of the per-module "
          f"relative errors: {worst:.2e} (both the best rank-32 approximation)")


if __name__ == "__main__":
    main()
