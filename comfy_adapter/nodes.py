"""The MusubiTuner node pack's registry: every node class and its display name, by theme."""
from . import nodes_advanced, nodes_cache, nodes_data, nodes_generate, nodes_io, nodes_lora, nodes_new, nodes_train
from .base import locate_errors

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (nodes_new, nodes_data, nodes_cache, nodes_train, nodes_generate, nodes_io, nodes_lora, nodes_advanced):
    for _name, (_cls, _title) in _module.NODES.items():
        NODE_CLASS_MAPPINGS[_name] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_name] = _title
        # Every node's errors name the node (and its id): "Memory Optimizer (node 7): ...".
        _function = getattr(_cls, _cls.FUNCTION)
        if not getattr(_function, "__located__", False):
            setattr(_cls, _cls.FUNCTION, locate_errors(_function))
