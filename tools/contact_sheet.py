"""Contact sheet of a dataset: thumbnails (first/middle/last frame of videos), captions and flags in one image."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

BACKGROUND = (24, 24, 28)
TILE = (40, 40, 46)
TEXT = (225, 225, 225)
FLAG_ERROR = (210, 40, 40)  # unreadable, missing caption, too short
FLAG_WARN = (215, 140, 20)  # empty caption, truncated
ERROR_WORDS = ("unreadable", "no caption", "too short", "missing file")


def make_contact_sheet(items: Iterable, columns: int = 6, thumb: int = 160, caption_lines: int = 3,
                       title: str = ""):
    """A PIL image with one tile per dataset item (`tools.dataset.Item`): its thumbnail (three frames
    side by side for a video), file name, wrapped and truncated caption, and a coloured band naming
    each flag. Unreadable media get a crossed-out tile instead of a thumbnail."""
    from PIL import Image, ImageDraw, ImageFont

    items = list(items)
    font = ImageFont.load_default()
    line_h = 12
    text_h = line_h * (caption_lines + 1) + 6
    tile_w, tile_h = thumb + 8, thumb + text_h + 8
    rows = max(1, -(-len(items) // columns))
    top = 22 if title else 0
    sheet = Image.new("RGB", (columns * tile_w, top + rows * tile_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 5), title, fill=TEXT, font=font)
    chars = max(8, thumb // 6)
    for n, item in enumerate(items):
        x0, y0 = (n % columns) * tile_w + 4, top + (n // columns) * tile_h + 4
        draw.rectangle([x0, y0, x0 + thumb - 1, y0 + thumb - 1], fill=TILE)
        picture = None if item.error and "unreadable" in item.flags else _thumbnail(item, thumb)
        if picture is None:
            draw.line([x0, y0, x0 + thumb - 1, y0 + thumb - 1], fill=FLAG_ERROR, width=3)
            draw.line([x0, y0 + thumb - 1, x0 + thumb - 1, y0], fill=FLAG_ERROR, width=3)
        else:
            sheet.paste(picture, (x0 + (thumb - picture.width) // 2, y0 + (thumb - picture.height) // 2))
        # flags: one band per flag across the thumbnail's bottom edge
        for k, flag in enumerate(reversed(item.flags[:3])):
            colour = FLAG_ERROR if any(w in flag for w in ERROR_WORDS) else FLAG_WARN
            by = y0 + thumb - (k + 1) * (line_h + 2)
            draw.rectangle([x0, by, x0 + thumb - 1, by + line_h + 1], fill=colour)
            draw.text((x0 + 3, by + 1), flag[:chars], fill=(255, 255, 255), font=font)
        ty = y0 + thumb + 3
        name = Path(item.path).name
        info = f" {item.frames}f" if item.frames else ""
        draw.text((x0, ty), (name[: chars - len(info) - 1] + info), fill=(160, 200, 255), font=font)
        for k, line in enumerate(_wrap(item.caption or "", chars, caption_lines)):
            draw.text((x0, ty + (k + 1) * line_h), line, fill=TEXT, font=font)
    return sheet


def _thumbnail(item, thumb: int):
    """The item's picture fitted in thumb x thumb, or None when it cannot be read."""
    from PIL import Image

    path = Path(item.path)
    try:
        if item.kind == "image":
            with Image.open(path) as im:
                im.draft("RGB", (thumb, thumb))  # JPEG decodes at a reduced scale: much faster
                picture = im.convert("RGB")
                picture.thumbnail((thumb, thumb))
                return picture
        if path.is_dir():
            from .dataset import frame_files

            frames = frame_files(path)
            chosen = [frames[0], frames[len(frames) // 2], frames[-1]] if frames else []
            images = [Image.open(p).convert("RGB") for p in chosen]
        else:
            from .video import grab_frames

            images = grab_frames(path, (0.0, 0.5, 1.0), max_size=thumb)
    except Exception:  # any unreadable media: the tile shows a cross, the report says why
        return None
    if not images:
        return None
    # three frames side by side, each a third of the tile wide
    cell = thumb // 3
    strip_h = max(1, min(thumb, int(images[0].height * cell / max(1, images[0].width))))
    strip = Image.new("RGB", (cell * len(images), strip_h), (0, 0, 0))
    for k, im in enumerate(images):
        strip.paste(im.resize((cell, strip_h)), (k * cell, 0))
    return strip


def _wrap(text: str, width: int, lines: int) -> list[str]:
    words, out, current = " ".join(text.split()).split(" "), [], ""
    for word in words:
        while len(word) > width:  # very long words are cut across lines
            if current:
                out.append(current)
                current = ""
            out.append(word[:width])
            word = word[width:]
        candidate = f"{current} {word}".strip()
        if len(candidate) <= width:
            current = candidate
        else:
            out.append(current)
            current = word
    if current:
        out.append(current)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: width - 3] + "..."
    return out


def save_png(image, path: str | os.PathLike) -> Path:
    """Save a PIL image as PNG atomically (temporary file next to it, then renamed)."""
    from ..files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
