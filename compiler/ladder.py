"""The memory-saving ladder of a step, as part of its plan: from the registry's rungs and the
step's own argv, the settings an out-of-memory retry may use, each a whole argv checked
against musubi's recorded parser. The executor only steps through them."""
from __future__ import annotations

from ..pipelines.registry import Family
from . import contract
from .plan import Fallback


def fallbacks(fam: Family, kind: str, script: str, args: list[str], task: str | None) -> list[Fallback]:
    """Cumulative fallbacks, cheapest first; [] for a step whose kind has no memory switches."""
    rungs = fam.stages[kind].ladder
    if not rungs:
        return []
    current = contract.values_of(script, args, {k for rung in rungs for k in rung.settings})  # unset: None / False
    changed: dict = {}
    out: list[Fallback] = []
    for rung in rungs:
        while True:
            change = {k: v for k, v in ((k, _next(v, current.get(k), rung.smaller, fam, task)) for k, v in rung.settings.items())
                      if v is not None}
            if not change:
                break
            for option, value in change.items():
                args = contract.set_option(script, args, option, value)
            reason = contract.check(script, args)
            if reason:  # a registry fact that musubi's parser disagrees with
                raise contract.ContractError(f"{fam.name} {kind} ladder: {script} rejects {change}: {reason}")
            current.update(change)
            changed.update(change)
            words = ", ".join(k if v is True else f"{k} {v}" for k, v in change.items())
            out.append(Fallback(settings=dict(changed), why=f"{words}: {rung.why}", args=list(args)))
            if not any(isinstance(v, str) for v in rung.settings.values()):
                break  # only "+N" rungs repeat
    return out


def _next(target, now, smaller: bool, fam: Family, task: str | None):
    """The value a rung moves an option to from `now`, or None where it saves nothing more."""
    if isinstance(target, str) and target.startswith("+"):  # raise by N up to the model's maximum
        top = fam.dit(task).max_blocks_to_swap
        have = int(now or 0)
        return min(top, have + int(target[1:])) if have < top else None
    if isinstance(target, bool):
        return target if bool(now) != target else None
    if now is None:
        return target
    return target if (now > target if smaller else now < target) else None
