"""The compiler: a validated pipeline becomes a graph of stages, then a plan of musubi commands."""
from .build import compile_file, compile_pipeline

__all__ = ["compile_file", "compile_pipeline"]
