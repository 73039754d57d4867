"""The compiler: a validated pipeline becomes a graph of stages, then a plan of musubi commands.

`build` (pydantic models, the dataset language) is imported on first use, so that the modules
which only read plans (executors, monitor, the ComfyUI pack) load none of it."""

__all__ = ["compile_file", "compile_pipeline"]


def __getattr__(name):
    if name in __all__:
        from . import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
