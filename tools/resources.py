"""GPU memory, load and processes from NVML (nvidia-ml-py), with advice on musubi's memory options."""
from __future__ import annotations

from dataclasses import dataclass, field

MIB = 2 ** 20


@dataclass
class GpuProcess:
    pid: int
    name: str
    used_mib: int | None  # None where the driver does not say (some Windows and container setups)


@dataclass
class GpuInfo:
    index: int
    name: str
    memory_total_mib: int
    memory_used_mib: int
    memory_free_mib: int
    utilization_pct: int | None
    temperature_c: int | None
    processes: list[GpuProcess] = field(default_factory=list)

    def line(self) -> str:
        load = f", {self.utilization_pct}% busy" if self.utilization_pct is not None else ""
        temp = f", {self.temperature_c} C" if self.temperature_c is not None else ""
        return (f"GPU {self.index} {self.name}: {self.memory_used_mib / 1024:.1f} of {self.memory_total_mib / 1024:.1f} GiB "
                f"used, {self.memory_free_mib / 1024:.1f} GiB free{load}{temp}")


@dataclass
class GpuReport:
    gpus: list[GpuInfo]
    message: str = ""  # why no GPU is listed, in one sentence with the fix

    @property
    def available(self) -> bool:
        return bool(self.gpus)

    def as_dict(self) -> dict:
        return {"available": self.available, "message": self.message,
                "gpus": [{**g.__dict__, "processes": [p.__dict__ for p in g.processes]} for g in self.gpus]}


def _why_no_nvml(err: Exception, pynvml) -> str:
    kinds = {
        "NVMLError_LibraryNotFound": "no NVIDIA driver found: the NVML library (libnvidia-ml / nvml.dll) is missing. "
                                     "musubi-tuner needs an NVIDIA GPU; install the NVIDIA driver, or run on a machine with one",
        "NVMLError_DriverNotLoaded": "the NVIDIA driver is installed but not loaded; reboot or load the kernel module "
                                     "(nvidia-smi shows the same error)",
        "NVMLError_NoPermission": "no permission to query the NVIDIA driver; run as a user in the video group, or in a "
                                  "container started with GPU access",
    }
    for name, text in kinds.items():
        cls = getattr(pynvml, name, None)
        if cls is not None and isinstance(err, cls):
            return text
    return f"cannot query the NVIDIA driver: {err}"


def gpu_report() -> GpuReport:
    """Every GPU NVML lists, or an empty report with a message saying why there is none."""
    try:
        import pynvml
    except ImportError:
        return GpuReport([], "nvidia-ml-py is not installed, so GPUs cannot be read; pip install nvidia-ml-py")
    try:
        pynvml.nvmlInit()
    except Exception as err:  # the NVMLError subclasses are created at run time
        return GpuReport([], _why_no_nvml(err, pynvml))
    try:
        gpus = [_read_gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception as err:
        return GpuReport([], _why_no_nvml(err, pynvml))
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return GpuReport(gpus, "" if gpus else "the NVIDIA driver lists no GPU")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(fn, *args):
    try:
        return fn(*args)
    except Exception:  # not supported on this GPU or driver
        return None


def _read_gpu(nv, index: int) -> GpuInfo:
    h = nv.nvmlDeviceGetHandleByIndex(index)
    mem = nv.nvmlDeviceGetMemoryInfo(h)
    util = _optional(nv.nvmlDeviceGetUtilizationRates, h)
    temp = _optional(nv.nvmlDeviceGetTemperature, h, getattr(nv, "NVML_TEMPERATURE_GPU", 0))
    procs: dict[int, GpuProcess] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        for p in _optional(getattr(nv, getter), h) or []:
            used = getattr(p, "usedGpuMemory", None)
            used = used // MIB if isinstance(used, int) and used >= 0 else None
            if p.pid not in procs:
                procs[p.pid] = GpuProcess(p.pid, _process_name(nv, p.pid), used)
    return GpuInfo(index, _text(nv.nvmlDeviceGetName(h)), mem.total // MIB, mem.used // MIB, mem.free // MIB,
                   getattr(util, "gpu", None), temp, sorted(procs.values(), key=lambda p: -(p.used_mib or 0)))


def _process_name(nv, pid: int) -> str:
    name = _optional(nv.nvmlSystemGetProcessName, pid)
    if name:
        return _text(name).rsplit("/", 1)[-1]
    try:
        import psutil

        return psutil.Process(pid).name()
    except Exception:
        return "?"


def advice(gpu: GpuInfo, family: str | None = None, task: str | None = None, resolution: str = "832x480",
           frames: int = 33) -> str:
    """What to set for training on this GPU's free memory, from the memory planner."""
    from ..errors import PipelineError
    from .memory import plan_memory

    from ..pipelines import registry

    family = family or registry.default_family()
    free = gpu.memory_free_mib / 1024
    try:
        plan = plan_memory(family, task, free, resolution, frames)
    except PipelineError as err:
        return f"with {free:.1f} GiB free: {err.problems[0].message}"
    s = plan.chosen.settings
    parts = [f"gradient_checkpointing {'on' if s.gradient_checkpointing else 'off'}",
             "fp8_base" + ("+fp8_scaled" if plan.train.get("fp8_scaled") else "") if s.fp8 else "no fp8",
             f"blocks_to_swap {s.blocks_to_swap}"]
    text = f"{family} {plan.task} at {resolution}x{frames} with {free:.1f} GiB free: {', '.join(parts)}"
    if gpu.processes and gpu.memory_used_mib > 1024:
        text += (f"; {gpu.memory_used_mib / 1024:.1f} GiB are in use by {len(gpu.processes)} other process(es) "
                 f"({', '.join(p.name for p in gpu.processes[:3])}); closing them frees memory for a faster setting")
    return text


def report_text(report: GpuReport, family: str | None = None, task: str | None = None) -> str:
    if not report.available:
        return report.message
    lines = []
    for g in report.gpus:
        lines.append(g.line())
        for p in g.processes:
            used = f"{p.used_mib / 1024:.1f} GiB" if p.used_mib is not None else "memory unknown"
            lines.append(f"    pid {p.pid} {p.name}: {used}")
        lines.append("    advice: " + advice(g, family, task))
    return "\n".join(lines)
