"""Hand-built Wan plans for the executor tests, run against the musubi-tuner test double
(they do not depend on the compiler, so executor behaviour is pinned on its own)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from musubi_pipe.compiler.plan import GeneratedFile, Input, Output, Plan, Step, fingerprint
from musubi_pipe.executors.musubi_env import MusubiConfig

# The smallest Wan 2.1 1.3B pipeline the test double runs (clips/ beside the pipeline): its models,
# its dataset and the two caches. Tests and benchmarks add a name and their own stages; no braces,
# so it joins str.format templates as it is.
SMALL_WAN_MODELS = """\
family = "wan"
task = "t2v-1.3B"
[models]
dit = "models/wan_bf16.safetensors"
vae = "models/vae.safetensors"
t5 = "models/t5.safetensors"
"""
SMALL_WAN_DATA = """\
[dataset.general]
resolution = [96, 64]
caption_extension = ".txt"
[[dataset.datasets]]
video_directory = "clips"
cache_directory = "cache"
target_frames = [1]
[stages.latents]
kind = "cache_latents"
[stages.text]
kind = "cache_text_encoder"
"""
SMALL_WAN = SMALL_WAN_MODELS + SMALL_WAN_DATA


def make_images(folder: Path, names=("a", "b")) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (64, 48)).save(folder / f"{n}.png")
        (folder / f"{n}.txt").write_text(f"a photo of {n}", encoding="utf-8")


def config_for(checkout: Path, grace_s: float = 3.0) -> MusubiConfig:
    from musubi_double import double_python

    return MusubiConfig(musubi_dir=checkout, python=Path(double_python(checkout)), cancel_grace_s=grace_s)


def _step(**kw) -> Step:
    """A step as the compiler makes it: fingerprinted, with its memory ladder (task t2v-1.3B for Wan)."""
    from musubi_pipe.compiler.ladder import fallbacks
    from musubi_pipe.pipelines import registry

    step = Step(**kw)
    fam = registry.family(step.family)
    ladder = fallbacks(fam, step.kind, step.script, step.args, "t2v-1.3B" if fam.tasks else None) if step.kind in fam.stages else []
    return replace(step, fingerprint=fingerprint(step.script, step.args, step.launch_args, step.env), fallbacks=ladder)


def wan_plan(project: Path, epochs: int = 2, network_dim: int = 4, save_state: bool = False,
             steps: int | None = None, save_every_steps: int | None = None, env: dict | None = None,
             train_extra: list[str] = ()) -> Plan:
    """dataset TOML -> cache latents -> cache text encoder -> train -> post-hoc EMA -> convert."""
    project = Path(project)
    imgs, cache, out = project / "imgs", project / "cache", project / "out"
    if not imgs.exists():
        make_images(imgs)
    for f in ("vae.safetensors", "t5.pth", "wan_bf16.safetensors"):
        if not (project / f).exists():
            (project / f).write_text("weights")
    ds = project / "dataset.toml"
    toml = (f'[general]\nresolution = [64, 48]\ncaption_extension = ".txt"\n'
            f'[[datasets]]\nimage_directory = "{imgs.as_posix()}"\ncache_directory = "{cache.as_posix()}"\n')
    length = ["--max_train_steps", str(steps)] if steps else ["--max_train_epochs", str(epochs)]
    cadence = ["--save_every_n_steps", str(save_every_steps)] if save_every_steps else ["--save_every_n_epochs", "1"]
    train_args = ["--dataset_config", str(ds), "--dit", str(project / "wan_bf16.safetensors"), "--sdpa",
                  "--mixed_precision", "bf16", "--network_module", "networks.lora_wan", "--network_dim", str(network_dim),
                  "--optimizer_type", "adamw8bit", "--output_dir", str(out), "--output_name", "lora",
                  *length, *cadence, *(["--save_state"] if save_state else []), *train_extra]
    meta = {"output_dir": str(out), "output_name": "lora", "save_state": save_state}
    if steps:
        meta.update(max_train_steps=steps)
    else:
        meta.update(max_train_epochs=epochs)
    common_env = dict(env or {})
    steps_ = [
        _step(id="cache_latents", kind="cache_latents", family="wan", script="wan_cache_latents.py",
              args=["--dataset_config", str(ds), "--vae", str(project / "vae.safetensors")], env=common_env,
              inputs=[Input("dataset_config", str(ds)), Input("images", str(imgs)),
                      Input("vae", str(project / "vae.safetensors"))],
              outputs=[Output("latents", "files", str(cache), "*_wan.safetensors")]),
        _step(id="cache_text", kind="cache_text_encoder", family="wan", script="wan_cache_text_encoder_outputs.py",
              args=["--dataset_config", str(ds), "--t5", str(project / "t5.pth")], env=common_env,
              inputs=[Input("dataset_config", str(ds)), Input("images", str(imgs)), Input("t5", str(project / "t5.pth"))],
              outputs=[Output("text_cache", "files", str(cache), "*_wan_te.safetensors")]),
        _step(id="train", kind="train", family="wan", script="wan_train_network.py", args=train_args,
              launcher="accelerate", env=common_env,
              launch_args=["--num_processes", "1", "--mixed_precision", "bf16", "--num_cpu_threads_per_process", "1"],
              needs=["cache_latents", "cache_text"], meta=meta,
              inputs=[Input("dataset_config", str(ds)), Input("dit", str(project / "wan_bf16.safetensors")),
                      Input("latents", str(cache), from_step="cache_latents")],
              outputs=[Output("lora", "file", str(out / "lora.safetensors")),
                       Output("checkpoints", "files", str(out), "lora-0*.safetensors", required=False)]),
        _step(id="ema", kind="ema", family="wan", script="lora_post_hoc_ema.py", env=common_env,
              args=[str(out / (f"lora-step{save_every_steps:08d}.safetensors" if save_every_steps else "lora-000001.safetensors")),
                    str(out / "lora.safetensors"), "--beta", "0.9",
                    "--output_file", str(out / "lora_ema.safetensors")],
              needs=["train"], inputs=[Input("lora", str(out / "lora.safetensors"), from_step="train")],
              outputs=[Output("lora", "file", str(out / "lora_ema.safetensors"))]),
        _step(id="convert", kind="convert", family="wan", script="convert_lora.py", env=common_env,
              args=["--input", str(out / "lora_ema.safetensors"), "--output", str(out / "lora_comfy.safetensors"),
                    "--target", "other"],
              needs=["ema"], inputs=[Input("lora", str(out / "lora_ema.safetensors"), from_step="ema")],
              outputs=[Output("lora", "file", str(out / "lora_comfy.safetensors"))]),
    ]
    return Plan(name="wan-test", source=str(project / "pipeline.toml"), workdir=str(project), steps=steps_,
                files=[GeneratedFile(str(ds), toml)])


class Recorder:
    """A listener that keeps every event."""

    def __init__(self):
        self.events = []

    def __call__(self, e):
        self.events.append(e)

    def kinds(self, kind):
        return [e for e in self.events if e.kind == kind]

    def ended(self):
        return {e.step: e.data for e in self.kinds("step_end")}

    def skipped(self):
        return {e.step: e.data["reason"] for e in self.kinds("step_skipped")}
