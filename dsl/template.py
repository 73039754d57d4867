"""`{{ var }}` interpolation of a shared document, with bounded cost.

The template language is a small part of Jinja: variables, literals, `~` and arithmetic, the
filters in FILTERS, tests, `x if c else y` and `{% if %}`. Loops, `set`, calls, macros, attribute
access and includes are refused before anything runs (each can cost unbounded time or memory
or reach Python objects). Without loops and calls a template's work is linear in its length;
the operators that could still build a huge value (`*`, `**`, `+`, `~`, `%`, `replace`) check
the size of their result before making it, and a rendered value is at most MAX_STRING
characters."""
from __future__ import annotations

import math
import re
from typing import Any

from .limits import MAX_STRING


class TemplateRefused(Exception):
    """A template the language does not allow or cannot render: message and fix."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.message, self.fix = message, fix


FILTERS = ("lower", "upper", "title", "capitalize", "trim", "default", "d", "string", "int", "float", "round", "abs",
           "replace", "length")
_MAX_INT_BITS = 1024  # integers stay printable (Python refuses to print more than 4300 digits)
_ENV: list = []


MAX_TEMPLATES = 1000  # Jinja-rendered strings per document (about 0.4 ms each to compile)
_SIMPLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def render(text: str, context: dict[str, Any], budget: list[int] | None = None) -> str:
    """Render one string; TemplateRefused with a message and fix on any failure. `budget`
    counts the Jinja renders a document has left (plain {{ name }} strings cost none)."""
    rest = _SIMPLE.sub("", text)
    if "{{" not in rest and "{%" not in rest and "{#" not in rest:
        return _substitute(text, context)
    if budget is not None:
        budget[0] -= 1
        if budget[0] < 0:
            raise TemplateRefused(f"the document has more than {MAX_TEMPLATES} templates beyond plain {{{{ name }}}}",
                                  "compute shared values once under [vars] and use {{ name }}")
    env = _environment()
    import jinja2

    try:
        ast = env.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateRefused(f"template syntax error: {exc.message}", "close every {{ with }} and every {% if %} with {% endif %}") from None
    except RecursionError:
        raise TemplateRefused("the template nests too deeply", "simplify the expression") from None
    _check(ast)
    try:
        template = env.from_string(_Bounded().visit(ast))
        out: list[str] = []
        size = 0
        for chunk in template.generate(context):
            size += len(chunk)
            if size > MAX_STRING:
                raise TemplateRefused(f"the rendered value is longer than {MAX_STRING} characters", "render a shorter value")
            out.append(chunk)
        return "".join(out)
    except TemplateRefused:
        raise
    except jinja2.UndefinedError as exc:
        raise TemplateRefused(f"{exc.message}", "define it under [vars]") from None
    except jinja2.TemplateError as exc:
        raise TemplateRefused(f"template error: {exc.message or exc}", "check the expression") from None
    except (ArithmeticError, ValueError, TypeError, LookupError, RecursionError) as exc:
        raise TemplateRefused(f"the template fails: {exc.__class__.__name__}: {exc}", "check the expression and the values it uses") from None


def _substitute(text: str, context: dict[str, Any]) -> str:
    """{{ name }} replaced by its value, as Jinja renders it; the size is checked before the
    value is built."""
    parts: list[str] = []
    size, last = 0, 0
    for match in _SIMPLE.finditer(text):
        name = match.group(1)
        if name not in context:
            raise TemplateRefused(f"{name!r} is undefined", "define it under [vars]")
        for part in (text[last:match.start()], str(context[name])):
            size += len(part)
            parts.append(part)
        if size > MAX_STRING:
            raise _too_big("the rendered value")
        last = match.end()
    parts.append(text[last:])
    if size + len(text) - last > MAX_STRING:
        raise _too_big("the rendered value")
    return "".join(parts)


def _check(ast) -> None:
    """Refuse every node outside the small language (see the module docstring)."""
    from jinja2 import nodes

    allowed = (nodes.Template, nodes.Output, nodes.TemplateData, nodes.If, nodes.Name, nodes.Const, nodes.Concat,
               nodes.BinExpr, nodes.UnaryExpr, nodes.Compare, nodes.Operand, nodes.CondExpr, nodes.Filter, nodes.Test,
               nodes.Getitem, nodes.Slice)
    for node in ast.find_all(nodes.Node):
        if not isinstance(node, allowed):
            what = {"For": "loops ({% for %})", "Assign": "{% set %}", "AssignBlock": "{% set %}", "Call": "calls such as f(x)",
                    "Getattr": "attributes such as x.y", "Macro": "macros", "Include": "include", "Import": "import",
                    "FromImport": "import", "Extends": "extends", "Block": "blocks",
                    "Tuple": "lists", "List": "lists", "Dict": "tables"}.get(type(node).__name__, type(node).__name__)
            raise TemplateRefused(f"{what} are not allowed in a pipeline template",
                                  "use {{ variable }}, filters such as | lower, ~ to join and {% if %}; compute longer values under [vars]")
        if isinstance(node, nodes.Filter) and node.name not in FILTERS:
            raise TemplateRefused(f"the filter {node.name!r} is not allowed in a pipeline template", f"use one of: {', '.join(FILTERS)}")
        if isinstance(node, (nodes.Filter, nodes.Test)) and (node.dyn_args is not None or node.dyn_kwargs is not None):
            raise TemplateRefused("*args and **kwargs are not allowed in a pipeline template", "pass the arguments one by one")


def _environment():
    if _ENV:
        return _ENV[0]
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    class Bounded(SandboxedEnvironment):
        # Intercepted operators are also never folded at compile time, so a constant such as
        # 'a' * 2000000000 is checked here too.
        intercepted_binops = frozenset({"*", "**", "+", "%", "//", "/"})

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

    env = Bounded(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.globals.clear()  # no range, lipsum, cycler, joiner, namespace, dict
    env.filters = {name: env.filters[name] for name in FILTERS}
    env.filters["replace"] = _replace
    env.filters["_join"] = _join
    _ENV.append(env)
    return env


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


def _too_big(what: str) -> TemplateRefused:
    return TemplateRefused(f"{what} would be longer than {MAX_STRING} characters", "render a shorter value")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if _size(seq) is not None and isinstance(n, int) and _size(seq) * max(n, 0) > MAX_STRING:
                raise _too_big("the repeated value")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
            raise TemplateRefused("the product is too large a number", "use smaller numbers")
    elif operator == "**":
        if isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(left) > 1 and right > 0:
            if right * math.log2(abs(left)) > _MAX_INT_BITS:
                raise TemplateRefused("the power is too large a number", "use smaller numbers")
    elif operator == "+":
        if _size(left) is not None and _size(right) is not None and _size(left) + _size(right) > MAX_STRING:
            raise _too_big("the joined value")
    elif operator == "%" and isinstance(left, str):
        raise TemplateRefused("string formatting with % is not allowed in a pipeline template", "join values with ~")


def _replace(value: Any, old: Any, new: Any, count: int | None = None) -> str:
    text, old, new = str(value), str(old), str(new)
    n = text.count(old) if count is None else min(text.count(old), max(count, 0))
    if len(text) + n * (len(new) - len(old)) > MAX_STRING:
        raise _too_big("the replaced value")
    return text.replace(old, new) if count is None else text.replace(old, new, count)


def _join(items) -> str:
    parts = [str(x) for x in items]
    if sum(len(p) for p in parts) > MAX_STRING:
        raise _too_big("the joined value")
    return "".join(parts)


def _bounded_class():
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    class Bounded(NodeTransformer):
        """`a ~ b ~ c` joins through the size-checked _join filter instead of Jinja's own join."""

        def visit_Concat(self, node):  # noqa: N802 - the visitor's naming
            self.generic_visit(node)
            return nodes.Filter(nodes.Tuple(list(node.nodes), "load", lineno=node.lineno), "_join", [], [], None, None, lineno=node.lineno)

    return Bounded


def _Bounded():  # noqa: N802
    return _bounded_class()()
