"""Reading an animated GIF by its timeline: what it shows at a given time, whatever frames Pillow merged."""
import numpy as np
from PIL import Image, ImageSequence

from plot_func import GIF_FRAME_MS, GIF_HOLD_LAST_MS


def timeline(gif) -> tuple[list[tuple[int, np.ndarray]], int]:
    """(start ms, RGB pixels) of each stored frame of a GIF (a path or an open file), and its total length in ms."""
    with Image.open(gif) as img:
        frames, t = [], 0
        for frame in ImageSequence.Iterator(img):
            frames.append((t, np.asarray(frame.convert("RGB"), dtype=float)))
            t += frame.info["duration"]
    return frames, t


def shown(gif, n: int) -> list[np.ndarray]:
    """The pictures a GIF saved from `n` frames (by save_gif's timing) shows at each of their start times.

    Fails where the GIF does not last exactly as long as those n frames do."""
    frames, total = timeline(gif)
    assert total == (n - 1) * GIF_FRAME_MS + GIF_HOLD_LAST_MS, f"the GIF lasts {total} ms, not that of {n} frames"
    return [next(px for start, px in reversed(frames) if start <= k * GIF_FRAME_MS) for k in range(n)]


def plays(gif, frames: list[np.ndarray]) -> bool:
    """Whether a GIF saved from `frames` shows, at each one's start time, that frame or one as near to it (ties
    come from frames that differ by less than the palette keeps)."""
    frames = [np.asarray(f, dtype=float) for f in frames]
    return all(np.abs(seen - want).mean() <= min(np.abs(seen - f).mean() for f in frames) + 0.1
               for seen, want in zip(shown(gif, len(frames)), frames))
