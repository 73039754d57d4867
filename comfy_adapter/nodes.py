"""The MusubiTuner node pack's registry: every node class and its display name, by theme."""
from . import nodes_advanced, nodes_cache, nodes_data, nodes_generate, nodes_io, nodes_lora, nodes_new, nodes_train

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (nodes_new, nodes_data, nodes_cache, nodes_train, nodes_generate, nodes_lora, nodes_io, nodes_advanced):
    for _name, (_cls, _title) in _module.NODES.items():
        NODE_CLASS_MAPPINGS[_name] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_name] = _title
