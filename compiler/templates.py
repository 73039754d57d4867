"""Per-family templates (pipelines/templates/*.toml): which script each stage runs, which
model files it needs, its defaults. Data, so a new family is a new file, not new code."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..files import tomllib

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "templates"


@dataclass(frozen=True)
class StageTemplate:
    script: str
    launcher: str = "python"
    models: dict[str, str] = field(default_factory=dict)  # slot -> required | sampling | if_task:<prop> | ...
    defaults: dict[str, Any] = field(default_factory=dict)
    task_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # family-neutral field -> this family's musubi option


@dataclass(frozen=True)
class FamilyTemplate:
    family: str
    title: str
    cache_arch: str
    network_module: str
    lora_key_prefix: str
    target_fps: int
    merge_with: str
    default_task: str | None
    tasks: dict[str, dict[str, Any]]
    stages: dict[str, StageTemplate]

    def task_props(self, task: str | None) -> dict[str, Any]:
        return self.tasks.get(task or self.default_task or "", {})


@lru_cache(maxsize=None)
def family_template(family: str) -> FamilyTemplate:
    data = tomllib.loads((TEMPLATE_DIR / f"{family}.toml").read_text(encoding="utf-8"))
    common = tomllib.loads((TEMPLATE_DIR / "common.toml").read_text(encoding="utf-8"))
    stages = {**common["stages"], **data["stages"]}
    return FamilyTemplate(
        family=data["family"],
        title=data["title"],
        cache_arch=data["cache_arch"],
        network_module=data["network_module"],
        lora_key_prefix=data["lora_key_prefix"],
        target_fps=data["target_fps"],
        merge_with=data["merge_with"],
        default_task=data.get("default_task"),
        tasks=data.get("tasks", {}),
        stages={kind: StageTemplate(**spec) for kind, spec in stages.items()},
    )


def families() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.toml") if p.stem != "common")
