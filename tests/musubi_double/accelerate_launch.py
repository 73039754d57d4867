"""Test double of `accelerate launch` (accelerate 1.6): the flags musubi-pipe emits, script run as child processes.

Installed as ``accelerate/commands/launch.py`` in a fake checkout's venv, so
``python -m accelerate.commands.launch [flags] script.py [args]`` works as with the real package:
the script runs in a child process (one per ``--num_processes`` with ``--multi_gpu``), this
process waits for it, and a non-zero child exit becomes a ``CalledProcessError`` traceback
(rc 1), as in accelerate's ``simple_launcher``. No signal handling, as in the real launcher.
"""
import argparse
import os
import subprocess
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("accelerate <command> [<args>] launch", allow_abbrev=False)
    p.add_argument("--config_file", "--config-file", default=None)
    p.add_argument("--quiet", "-q", action="store_true")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--multi_gpu", "--multi-gpu", action="store_true")
    p.add_argument("--mixed_precision", "--mixed-precision", choices=["no", "fp16", "bf16", "fp8"])
    p.add_argument("--num_processes", "--num-processes", type=int, default=None)
    p.add_argument("--num_machines", "--num-machines", type=int, default=None)
    p.add_argument("--machine_rank", "--machine-rank", type=int, default=0)
    p.add_argument("--main_process_ip", "--main-process-ip", default=None)
    p.add_argument("--main_process_port", "--main-process-port", type=int, default=None)
    p.add_argument("--num_cpu_threads_per_process", "--num-cpu-threads-per-process", type=int, default=None)
    p.add_argument("--gpu_ids", "--gpu-ids", default=None)
    p.add_argument("--dynamo_backend", "--dynamo-backend", default=None)
    p.add_argument("--same_network", "--same-network", action="store_true")
    p.add_argument("training_script")
    p.add_argument("training_script_args", nargs=argparse.REMAINDER)
    return p


def main() -> None:
    args = parser().parse_args()
    warned = []
    if args.num_processes is None:
        warned.append("\t`--num_processes` was set to a value of `1`")
        args.num_processes = 1
    if args.num_machines is None:
        warned.append("\t`--num_machines` was set to a value of `1`")
        args.num_machines = 1
    if args.mixed_precision is None:
        warned.append("\t`--mixed_precision` was set to a value of `'no'`")
        args.mixed_precision = "no"
    if args.dynamo_backend is None:
        warned.append("\t`--dynamo_backend` was set to a value of `'no'`")
    if warned:
        sys.stderr.write(
            "The following values were not passed to `accelerate launch` and had defaults used instead:\n"
            + "\n".join(warned)
            + "\nTo avoid this warning pass in values for each of the problematic parameters or run `accelerate config`.\n"
        )
    env = dict(os.environ)
    env["ACCELERATE_MIXED_PRECISION"] = args.mixed_precision
    env["OMP_NUM_THREADS"] = str(args.num_cpu_threads_per_process or 1)
    if args.gpu_ids and args.gpu_ids != "all":
        env["CUDA_VISIBLE_DEVICES"] = args.gpu_ids
    cmd = [sys.executable, args.training_script, *args.training_script_args]
    world = args.num_processes if args.multi_gpu else 1
    children = []
    for rank in range(world):
        child_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                     "MASTER_PORT": str(args.main_process_port or 29500)}
        if rank > 0:  # other ranks run too (so cancel must reach them) but only rank 0 talks and writes
            child_env["MUSUBI_DOUBLE_SILENT_RANK"] = "1"
        children.append(subprocess.Popen(cmd, env=child_env))
    bad = children[0].wait()
    for other in children[1:]:  # like torchrun: the group ends when rank 0 ends
        other.terminate()
        other.wait()
    if bad:
        if args.quiet:
            sys.exit(1)
        raise subprocess.CalledProcessError(returncode=bad, cmd=cmd)


if __name__ == "__main__":
    main()
