"""The comparison that ends a run of a pipeline with sweeps (dsl/sweep.py): for each branch, the
final and smoothed loss (its TensorBoard log when the branch has a logging_dir, else the run's
progress events), its LoRA file, and its latest training sample; written to the run folder as
sweep.json, sweep.txt and sweep.png (the samples side by side), and the text returned for printing."""
from __future__ import annotations

import json
from pathlib import Path

from ..compiler.plan import Plan, Step
from ..files import write_atomic
from ..pipelines import registry

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TILE = 256


def compare(plan: Plan, run_dir: Path) -> str:
    """Write the comparison of every sweep's branches into run_dir; the text, or "" without sweeps."""
    if not plan.sweeps:
        return ""
    ids = {s.id: s for s in plan.steps}
    report: dict = {}
    lines: list[str] = []
    tiles: list[tuple[str, str | None]] = []
    for stage, sweep in plan.sweeps.items():
        rows = []
        for name, branch in sweep["branches"].items():
            train = _train_step(branch, ids)
            row = {"branch": branch["label"], "values": branch["values"], "step": train.id if train else None}
            if train is not None:
                row.update(_branch_facts(train, run_dir))
            rows.append(row)
            tiles.append((branch["label"], row.get("sample")))
        report[stage] = rows
        lines.append(f"sweep of {stage}: {len(rows)} branches")
        width = max(len(r["branch"]) for r in rows)
        lines.append(f"  {'branch'.ljust(width)}  {'final loss':>10}  {'smoothed':>10}  {'steps':>6}  lora")
        ranked = sorted(rows, key=lambda r: (r.get("smoothed_loss") is None, r.get("smoothed_loss") or 0.0))
        for r in ranked:
            lora = r.get("lora") or ""
            lines.append(f"  {r['branch'].ljust(width)}  {_num(r.get('final_loss')):>10}  {_num(r.get('smoothed_loss')):>10}  "
                         f"{str(r.get('steps') or '-'):>6}  {lora if r.get('lora_exists') else (lora + ' (missing)' if lora else '-')}")
        best = ranked[0] if ranked and ranked[0].get("smoothed_loss") is not None else None
        if best:
            lines.append(f"  lowest smoothed loss: {best['branch']} (loss alone does not pick the best LoRA: look at the samples)")
        lines.append("")
    sheet = _side_by_side(tiles, run_dir / "sweep.png")
    if sheet:
        lines.append(f"samples side by side: {sheet}")
    write_atomic(run_dir / "sweep.json", json.dumps(report, indent=2, ensure_ascii=False, default=str))
    text = "\n".join(lines).rstrip() + "\n"
    write_atomic(run_dir / "sweep.txt", text)
    return text


def _train_step(branch: dict, ids: dict[str, Step]) -> Step | None:
    """The branch's training step: the swept stage when it trains, else the first train downstream."""
    for new in branch["stages"].values():
        step = ids.get(new)
        if step is not None and step.kind == "train":
            return step
    return None


def _branch_facts(step: Step, run_dir: Path) -> dict:
    from ..tools.monitor import TrainingMonitor, smooth

    out_dir = (step.meta or {}).get("output_dir", "")
    logs = _arg(step, registry.option("logging_dir"))
    facts: dict = {}
    try:
        lora = step.output("lora").path
        facts["lora"] = lora
        facts["lora_exists"] = Path(lora).is_file()
    except KeyError:
        pass
    status = None
    sources = [Path(logs)] if logs and Path(logs).is_dir() else []
    sources.append(run_dir)  # this run's progress events for the step
    for source in sources:
        try:
            status = TrainingMonitor(source, sample_dirs=[Path(out_dir) / "sample"] if out_dir else [], step=step.id).poll()
        except (OSError, ValueError):
            continue
        if status.loss_series().values:
            break
    if status is not None:
        loss = status.loss_series()
        if loss.values:
            facts["final_loss"] = loss.values[-1]
            facts["smoothed_loss"] = smooth(loss.values)[-1]
            facts["steps"] = loss.steps[-1]
        images = [s.path for s in status.samples if s.path.lower().endswith(IMAGE_SUFFIXES)]
        if images:
            facts["sample"] = images[-1]
        facts["samples"] = len(status.samples)
    return facts


def _arg(step: Step, flag: str) -> str | None:
    for i, word in enumerate(step.args[:-1]):
        if word == flag:
            return step.args[i + 1]
    return None


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _side_by_side(tiles: list[tuple[str, str | None]], path: Path) -> Path | None:
    """Each branch's latest sample image in one row, its label above; None when no branch has one."""
    if not any(p for _, p in tiles):
        return None
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        return None
    font = ImageFont.load_default()
    top = 16
    sheet = Image.new("RGB", (TILE * len(tiles), TILE + top), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for n, (label, sample) in enumerate(tiles):
        draw.text((n * TILE + 4, 2), label[: TILE // 6], fill=(230, 230, 230), font=font)
        if not sample:
            continue
        try:
            with Image.open(sample) as img:
                img = img.convert("RGB")
                img.thumbnail((TILE, TILE))
                sheet.paste(img, (n * TILE + (TILE - img.width) // 2, top + (TILE - img.height) // 2))
        except (OSError, ValueError):
            continue
    import io

    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())
    return path
