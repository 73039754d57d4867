"""GPU report: the real NVML here (no NVIDIA GPU on the dev machine), and a stand-in NVML module
for the path with GPUs, its processes and the advice."""
from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest

from musubi_pipe.tools import resources

GIB = 2 ** 30


def has_nvidia_driver() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


@pytest.mark.skipif(has_nvidia_driver(), reason="this machine has an NVIDIA driver")
def test_no_nvidia_driver_gives_a_clear_message():
    report = resources.gpu_report()
    assert not report.available and report.gpus == []
    assert report.message.startswith("no NVIDIA driver found: the NVML library")
    assert "install the NVIDIA driver" in report.message
    assert resources.report_text(report) == report.message
    assert report.as_dict() == {"available": False, "message": report.message, "gpus": []}


def test_missing_nvidia_ml_py_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    assert resources.gpu_report().message == "nvidia-ml-py is not installed, so GPUs cannot be read; pip install nvidia-ml-py"


def fake_nvml(total_gib=24, used_gib=3, fail=None):
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_DriverNotLoaded(NVMLError):
        pass

    nv.NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    nv.NVML_TEMPERATURE_GPU = 0
    nv.calls = []

    def init():
        if fail:
            raise fail(nv)
        nv.calls.append("init")

    nv.nvmlInit = init
    nv.nvmlShutdown = lambda: nv.calls.append("shutdown")
    nv.nvmlDeviceGetCount = lambda: 1
    nv.nvmlDeviceGetHandleByIndex = lambda i: f"h{i}"
    nv.nvmlDeviceGetName = lambda h: b"NVIDIA GeForce RTX 4090"
    nv.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(total=total_gib * GIB, used=used_gib * GIB,
                                                           free=(total_gib - used_gib) * GIB)
    nv.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=87, memory=40)

    def no_temperature(h, sensor):
        raise NVMLError("Not Supported")

    nv.nvmlDeviceGetTemperature = no_temperature
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [SimpleNamespace(pid=4242, usedGpuMemory=2 * GIB)]
    nv.nvmlDeviceGetGraphicsRunningProcesses = lambda h: [SimpleNamespace(pid=77, usedGpuMemory=None),
                                                          SimpleNamespace(pid=4242, usedGpuMemory=2 * GIB)]
    nv.nvmlSystemGetProcessName = lambda pid: b"/usr/bin/python3" if pid == 4242 else b"/usr/lib/Xorg"
    return nv


def test_gpus_processes_and_advice(monkeypatch):
    nv = fake_nvml(total_gib=24, used_gib=3)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    report = resources.gpu_report()
    assert nv.calls == ["init", "shutdown"]
    (g,) = report.gpus
    assert (g.name, g.memory_total_mib, g.memory_free_mib, g.utilization_pct, g.temperature_c) == (
        "NVIDIA GeForce RTX 4090", 24 * 1024, 21 * 1024, 87, None)
    assert [(p.pid, p.name, p.used_mib) for p in g.processes] == [(4242, "python3", 2048), (77, "Xorg", None)]
    text = resources.report_text(report, family="wan", task="t2v-14B")
    assert text.splitlines()[0] == "GPU 0 NVIDIA GeForce RTX 4090: 3.0 of 24.0 GiB used, 21.0 GiB free, 87% busy"
    assert "pid 77 Xorg: memory unknown" in text
    assert "advice: wan t2v-14B at 832x480x33 with 21.0 GiB free: gradient_checkpointing on, fp8_base+fp8_scaled, " \
           "blocks_to_swap" in text
    assert "closing them frees memory for a faster setting" in text


def test_advice_when_nothing_fits():
    gpu = resources.GpuInfo(0, "small", 8 * 1024, 0, 8 * 1024, 0, 40)
    assert "needs about" in resources.advice(gpu, "wan", "t2v-14B") and "with 8.0 GiB free" in resources.advice(gpu)


def test_driver_not_loaded_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(fail=lambda nv: nv.NVMLError_DriverNotLoaded()))
    assert resources.gpu_report().message.startswith("the NVIDIA driver is installed but not loaded")


def test_cli_gpu(monkeypatch):
    from click.testing import CliRunner

    from musubi_pipe.cli import main

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(total_gib=80, used_gib=0))
    res = CliRunner().invoke(main, ["gpu", "--family", "wan", "--task", "t2v-1.3B"])
    assert res.exit_code == 0 and "gradient_checkpointing off, no fp8, blocks_to_swap 0" in res.output
    monkeypatch.setitem(sys.modules, "pynvml", None)
    res = CliRunner().invoke(main, ["gpu", "--json"])
    assert res.exit_code == 1 and json.loads(res.output)["available"] is False
