"""The `musubi-pipe` command line. Subcommands live next to what they drive and are imported
only when used, so `musubi-pipe --help` and `plan` stay fast."""
from __future__ import annotations

import importlib

import click

from . import __version__

# name -> ("module:attribute" relative to this package, the short help that `--help` shows).
# The short help is written here so that `--help` imports no subcommand's module;
# tests/test_startup.py checks it against each command's own docstring.
COMMANDS = {
    "new": (".tools.new_command:new", "Look at a folder of clips or images and write a commented pipeline for it."),
    "validate": (".compiler.commands:validate", "Check a pipeline file; print every problem with its place and fix."),
    "plan": (".compiler.commands:plan",
             "Show the plan: the exact musubi-tuner commands, in order, and what each needs and makes."),
    "dag": (".compiler.commands:dag", "Draw the stage graph as text, mermaid or Graphviz dot."),
    "schema": (".compiler.commands:schema",
               "Print the JSON Schema of pipeline files (for editor completion and checking)."),
    "export-comfy": (".comfy_adapter.export:export_comfy", "Write the ComfyUI workflow that does what "
                     "`musubi-pipe run PIPELINE` does, made of the MusubiTuner nodes."),
    "run": (".executors.commands:run", "Run PIPELINE: skip steps that are up to date, run the rest in "
            "musubi-tuner's venv, resume interrupted training. Ctrl-C stops every process the run started."),
    "doctor": (".executors.commands:doctor", "Check the local setup: musubi-tuner, its Python, torch and CUDA, "
               "accelerate, tensorboard, lycoris, GPUs and free disk, each problem with its fix."),
    "init": (".executors.commands:init", "Write the local configuration file. accelerate needs no "
             "`accelerate config`: musubi-pipe passes explicit `accelerate launch` flags."),
    "dataset": (".tools.media_commands:dataset", "Look at a musubi dataset the way musubi will see it."),
    "video": (".tools.media_commands:video", "Read frames from videos and encode frames to MP4/WebM."),
    "monitor": (".tools.media_commands:monitor",
                "Loss, learning rate, progress, ETA and samples of a run folder or a TensorBoard log folder."),
    "lora": (".tools.lora_commands:lora", "Inspect LoRA files and merge several into one."),
    "plan-memory": (".tools.lora_commands:plan_memory_command",
                    "The fastest memory settings that fit the GPU, with the reason for each."),
    "gpu": (".tools.lora_commands:gpu", "GPU memory, load and processes, with advice on musubi's memory options."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target[0].split(":")
        return getattr(importlib.import_module(module, __package__), attr)

    def format_commands(self, ctx, formatter):
        """click's own listing, made from stand-ins that carry only the short help: click.Group
        would ask every real command for its help, importing all of them."""
        stand_ins = {name: click.Command(name, help=short) for name, (_, short) in COMMANDS.items()}
        click.Group(commands=stand_ins).format_commands(ctx, formatter)


@click.group(cls=LazyGroup)
@click.version_option(__version__, package_name="musubi-pipe")  # no package metadata look-up
def main():
    """Declarative pipelines for musubi-tuner: dataset, cache, train, EMA, convert, generate."""


if __name__ == "__main__":
    main()
