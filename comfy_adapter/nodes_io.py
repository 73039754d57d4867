"""IO nodes: load a video as frames, save frames as MP4/WebM, and many prompts for one generator run."""
from __future__ import annotations

import os
from pathlib import Path

from .base import NodeError, tip
from .nodes_generate import PROMPTS


def _videos_in_input() -> list[str]:
    try:
        import folder_paths
    except ImportError:
        return []
    folder = folder_paths.get_input_directory()
    names = [f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))]
    return sorted(folder_paths.filter_files_content_types(names, ["video"]))


class VideoInput:
    DESCRIPTION = "Loads a video as IMAGE frames (a start frame, a stride, a frame count or a target frame rate)."
    CATEGORY = "MusubiTuner/IO"
    RETURN_TYPES = ("IMAGE", "FLOAT", "INT")
    RETURN_NAMES = ("frames", "fps", "frame_count")
    OUTPUT_TOOLTIPS = ("the frames, [N, H, W, 3]", "frame rate of the returned frames", "number of frames returned")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "video": (["(path)", *_videos_in_input()], {"default": "(path)", "tooltip": "a video in ComfyUI's input folder"}),
            "path": tip("STRING", "or a video file path (used when video is (path))", default=""),
            "start": tip("INT", "first frame", default=0, min=0, max=10**7),
            "stride": tip("INT", "take every Nth frame", default=1, min=1, max=1000),
            "count": tip("INT", "frames to take (0 = all)", default=0, min=0, max=100000),
            "fps": tip("FLOAT", "resample to this frame rate (0 = keep)", default=0.0, min=0.0, max=240.0, step=0.5),
        }}

    @classmethod
    def IS_CHANGED(cls, video, path, **kw):
        file = cls._file(video, path)
        return f"{file} {os.path.getmtime(file)}" if os.path.exists(file) else float("nan")

    @staticmethod
    def _file(video: str, path: str) -> str:
        if video != "(path)":
            import folder_paths

            return folder_paths.get_annotated_filepath(video)
        return path.strip()

    def load(self, video, path, start, stride, count, fps):
        import torch

        from ..tools.video import MediaError, probe, read_frames

        file = self._file(video, path)
        if not file:
            raise NodeError("no video: pick one or give a path")
        try:
            info = probe(file)
            frames = read_frames(file, start=start, stride=stride, count=count or None, fps=fps or None)
        except (MediaError, FileNotFoundError) as exc:
            raise NodeError(str(exc)) from None
        rate = float(fps or (info.fps or 0) / stride)
        return (torch.from_numpy(frames), rate, int(frames.shape[0]))


class VideoOutput:
    DESCRIPTION = "Saves IMAGE frames as an MP4 (H.264) or WebM (VP9) video in ComfyUI's output folder."
    CATEGORY = "MusubiTuner/IO"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("the saved file",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "frames": ("IMAGE", {"tooltip": "frames to encode"}),
            "fps": tip("FLOAT", "frame rate", default=16.0, min=1.0, max=240.0, step=0.5),
            "format": (["mp4", "webm"], {"default": "mp4", "tooltip": "mp4: H.264; webm: VP9"}),
            "filename_prefix": tip("STRING", "file name prefix inside the output folder", default="musubi/video"),
            "quality": tip("INT", "CRF: lower is better (0 = the codec's default)", default=0, min=0, max=63),
        }}

    def save(self, frames, fps, format, filename_prefix, quality):
        import folder_paths

        from ..tools.video import MediaError, write_video

        array = frames.cpu().numpy()
        height, width = array.shape[1], array.shape[2]
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, folder_paths.get_output_directory(), width, height)
        file = f"{name}_{counter:05}_.{format}"
        try:
            write_video(array[:, : height // 2 * 2, : width // 2 * 2], Path(folder) / file, fps=fps, crf=quality or None)
        except MediaError as exc:
            raise NodeError(str(exc)) from None
        saved = {"filename": file, "subfolder": subfolder, "type": "output"}
        return {"ui": {"images": [saved], "animated": (True,)}, "result": (str(Path(folder) / file),)}


class BatchProcessor:
    DESCRIPTION = ("Many prompts for one generator run: the model loads once and makes one video per prompt. "
                   "One prompt per line; seeds count up from the seed given here.")
    CATEGORY = "MusubiTuner/IO"
    RETURN_TYPES = (PROMPTS,)
    RETURN_NAMES = ("prompts",)
    OUTPUT_TOOLTIPS = ("connect to a generator's prompts input",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prompts": tip("STRING", "one prompt per line (empty lines are skipped); a line may end with musubi's "
                           "per-prompt options: " + _prompt_options_help() + ", e.g. a fox --w 832 --h 480 --s 20 --d 7",
                           multiline=True, default=""),
            "seed": tip("INT", "seed of the first prompt; the next ones count up (-1 = random each)", default=-1, min=-1, max=2**31 - 1, control_after_generate=False),
        }}

    def build(self, prompts, seed):
        from .nodes_train import parse_sample_prompts

        parsed = parse_sample_prompts(prompts, "prompts")
        if not parsed:
            raise NodeError("prompts: none given; write one prompt per line")
        # A line's own --d wins over the counted seed.
        return ([{**({"seed": seed + i} if seed >= 0 else {}), **p} for i, p in enumerate(parsed)],)


def _prompt_options_help() -> str:
    from .nodes_train import sample_options_help

    return sample_options_help()


NODES = {
    "MusubiTuner_VideoInput": (VideoInput, "Video Input (musubi)"),
    "MusubiTuner_VideoOutput": (VideoOutput, "Video Output (musubi)"),
    "MusubiTuner_BatchProcessor": (BatchProcessor, "Batch Processor (musubi)"),
}
