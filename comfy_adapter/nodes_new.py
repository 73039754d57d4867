"""The first node to use: a folder of clips or images -> what training on it needs (captions,
buckets, frame windows, model files found) and a pipeline proposal, as `musubi-pipe new` makes it.
It asks nothing and writes nothing, unless its caption-stub switch is on."""
from __future__ import annotations

import os
from pathlib import Path

from .base import DEFAULT_TASK, NodeError, all_task_choices, family_choices, one_line, registry, tip


def _comfy_paths() -> tuple[dict, Path, list[Path]]:
    """(environment with this ComfyUI as COMFYUI_DIR, the input folder relative paths start from,
    the folders caption stubs may be written in)."""
    env = dict(os.environ)
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI (tests): the current folder
        return env, Path.cwd(), [Path.cwd()]
    env["COMFYUI_DIR"] = str(folder_paths.base_path)
    roots = [Path(folder_paths.get_input_directory()), Path(folder_paths.get_output_directory()),
             Path(folder_paths.get_temp_directory())]
    return env, Path(folder_paths.get_input_directory()), roots


def _writable(folder: Path, roots: list[Path]) -> bool:
    """Caption stubs go only where a workflow may write: ComfyUI's input, output and temp folders
    and the local configuration's allowed_output_roots (a shared workflow names the folder)."""
    from ..errors import PipelineError
    from ..executors.musubi_env import is_inside, load_config

    try:
        roots = roots + list(load_config().allowed_output_roots)
    except PipelineError:
        pass
    return is_inside(folder, [r.expanduser().resolve() for r in roots])


class NewPipeline:
    DESCRIPTION = ("Start here: looks at a folder of clips or images and reports what training on it needs: which "
                   "files lack a caption, the resolution, buckets and frame windows it would use, which model files "
                   "were found in ComfyUI's model folders (and where to download the others), and a pipeline "
                   "proposal (`musubi-pipe new` writes the same file from the command line). Writes nothing unless "
                   "write_caption_stubs is on.")
    CATEGORY = "MusubiTuner/Data"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("report", "pipeline_toml")
    OUTPUT_TOOLTIPS = ("captions missing, proposed buckets and frames, models found", "the proposed pipeline file (TOML)")
    FUNCTION = "propose"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "media_folder": tip("STRING", "folder of clips or images (relative: inside ComfyUI's input folder)", default=""),
                "family": (family_choices(), {"default": registry().default_family(), "tooltip": "model family to train"}),
                "task": ([DEFAULT_TASK, *all_task_choices()], {"default": DEFAULT_TASK, "tooltip": "the family's task; "
                         f"{DEFAULT_TASK}: the family's default"}),
                "gpu_memory_gib": tip("FLOAT", "GPU memory to plan for; 0: this machine's largest GPU", default=0.0,
                                      min=0.0, max=1024.0, step=1.0),
                "write_caption_stubs": tip("BOOLEAN", "write a caption file from the file name for each clip or image "
                                           "without one (existing captions are never changed)", default=False),
            },
        }

    def propose(self, media_folder, family, task, gpu_memory_gib, write_caption_stubs):
        from ..errors import PipelineError
        from ..tools.proposal import propose, write_caption_stubs as write_stubs

        if not media_folder.strip():
            raise NodeError("media_folder is empty: give the folder that holds your clips or images")
        env, base, roots = _comfy_paths()
        folder = Path(media_folder.strip()).expanduser()
        folder = folder if folder.is_absolute() else base / folder
        try:
            proposal = propose(folder, family, None if task == DEFAULT_TASK else task, gpu_memory_gib or None, env)
        except PipelineError as err:
            raise NodeError(f"media_folder: {one_line(err)}") from None
        note = ""
        if write_caption_stubs:
            if not _writable(proposal.folder, roots):
                raise NodeError(f"write_caption_stubs: {proposal.folder} is outside ComfyUI's input/output folders and "
                                "allowed_output_roots; move the media there, or add the folder with "
                                "`musubi-pipe init --allow-output`")
            written = write_stubs(proposal.missing_captions())
            note = f"wrote {len(written)} caption stub(s) from file names: edit them to describe each file\n"
        report = note + proposal.report()
        return {"ui": {"text": [report]}, "result": (report, proposal.pipeline_toml(proposal.folder.parent / "pipeline.toml"))}


NODES = {"MusubiTuner_NewPipeline": (NewPipeline, "New Pipeline from a Folder (musubi)")}
