"""musubi-pipe: declarative, checkable pipelines for kohya-ss/musubi-tuner.

This file is also the entry point of the ComfyUI custom-node pack: ComfyUI imports the
repository root from custom_nodes/ and reads NODE_CLASS_MAPPINGS. The mappings are loaded on
first access so that `import musubi_pipe` for the command line stays instant.
"""
__version__ = "0.1.0"

WEB_DIRECTORY = "./web"


def __getattr__(name):
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from .comfy_adapter import nodes

        return getattr(nodes, name)
    raise AttributeError(name)
