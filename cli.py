"""The `musubi-pipe` command line. Subcommands live next to what they drive and are imported
only when used, so `musubi-pipe --help` and `plan` stay fast."""
from __future__ import annotations

import importlib

import click

# name -> "module:attribute", relative to this package
COMMANDS = {
    "validate": ".compiler.commands:validate",
    "plan": ".compiler.commands:plan",
    "dag": ".compiler.commands:dag",
    "schema": ".compiler.commands:schema",
    "export-comfy": ".comfy_adapter.export:export_comfy",
    "run": ".executors.commands:run",
    "doctor": ".executors.commands:doctor",
    "init": ".executors.commands:init",
    "dataset": ".tools.media_commands:dataset",
    "video": ".tools.media_commands:video",
    "monitor": ".tools.media_commands:monitor",
    "lora": ".tools.lora_commands:lora",
    "plan-memory": ".tools.lora_commands:plan_memory_command",
    "gpu": ".tools.lora_commands:gpu",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module, __package__), attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="musubi-pipe")
def main():
    """Declarative pipelines for musubi-tuner: dataset, cache, train, EMA, convert, generate."""


if __name__ == "__main__":
    main()
