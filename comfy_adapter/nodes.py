"""The MusubiTuner node pack's registry: every node class and its display name, by theme."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
