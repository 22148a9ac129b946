"""Write a generation's files atomically: video (mp4), image and contact sheet (PNG), metrics."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then move the file into place; nothing partial is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_uint8(frames) -> np.ndarray:
    """Frames [F, H, W, 3] in [0, 1] (tensor or array) -> uint8 array."""
    array = frames.detach().float().cpu().numpy() if hasattr(frames, "detach") else frames
    return (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)


class VideoWriterError(RuntimeError):
    """The mp4 writer is missing (imageio-ffmpeg not installed)."""


def write_image(path: Path, image: np.ndarray) -> Path:
    """PNG of a uint8 image [H, W, 3]."""
    return atomic_write(path, lambda p: Image.fromarray(image).save(p, format="PNG"))


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    """H.264 mp4 of uint8 frames [F, H, W, 3] (one PNG when F == 1)."""
    if frames.shape[0] == 1:
        return write_image(path.with_suffix(".png"), frames[0])
    import imageio.v2 as imageio

    def write(tmp: Path):
        try:
            writer = imageio.get_writer(
                tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1
            )
        except ImportError as error:
            raise VideoWriterError(
                f"{path} needs imageio's FFMPEG plugin: pip install imageio-ffmpeg ({error})"
            ) from error
        for frame in frames:
            writer.append_data(frame)
        writer.close()

    return atomic_write(path, write)


def contact_sheet(frames: np.ndarray, columns: int = 8, scale: int = 2) -> Image.Image:
    """All frames [F, H, W, 3] tiled in a grid, upscaled ``scale`` times for viewing."""
    count, height, width, _ = frames.shape
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    sheet = Image.new("RGB", (columns * width * scale, rows * height * scale), "white")
    for i, frame in enumerate(frames):
        tile = Image.fromarray(frame).resize((width * scale, height * scale), Image.NEAREST)
        sheet.paste(tile, ((i % columns) * width * scale, (i // columns) * height * scale))
    return sheet


def write_contact_sheet(path: Path, frames: np.ndarray) -> Path:
    return atomic_write(path, lambda p: contact_sheet(frames).save(p, format="PNG"))


def write_json(path: Path, data: dict) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))
