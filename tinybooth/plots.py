"""Pictures of a run: image grids (one writer for every command) and the loss curves.

Both return what they draw, so a notebook can show it (`display(grid)`, `fig`) and a command can save it; neither
switches matplotlib's backend, so a lesson that calls the library keeps showing its plots inline.
"""
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .data import to_uint8

GAP, TITLE_HEIGHT, MIN_CELL = 2, 14, 96  # px: white gap between cells, a row's title strip, titled cells' size


def grid_image(images, rows, titles=None):
    """[N, 3, H, W] in [-1, 1] -> a PIL image with `rows` rows of N / rows cells, 2 px white gaps. With titles
    (one per row, e.g. the prompt) each row gets its text above it and small cells are enlarged (nearest) to stay
    legible."""
    pixels = to_uint8(images)                                        # [N, H, W, 3]
    n, h, w, _ = pixels.shape
    cols = n // rows
    scale = max(1, -(-MIN_CELL // h)) if titles else 1               # ceil: 32 px cells -> 3x
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    head = TITLE_HEIGHT if titles else 0
    grid = np.full((rows * (h + head + GAP) - GAP, cols * (w + GAP) - GAP, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top = r * (h + head + GAP) + head
        grid[top:top + h, col * (w + GAP):col * (w + GAP) + w] = pixels[i]
    img = Image.fromarray(grid)
    if titles:
        draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=11)
        for r, title in enumerate(titles):
            draw.text((2, r * (h + head + GAP)), title, fill="black", font=font)
    return img


def save_grid(images, rows, path, titles=None, settings=None):
    """Write grid_image(...) as a PNG; settings (a dict: the seeds and sampler of every image) go into its text
    metadata under the key "tinybooth", as JSON. Returns the path."""
    meta = PngInfo()
    if settings is not None:
        meta.add_text("tinybooth", json.dumps(settings))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    grid_image(images, rows, titles).save(tmp, format="PNG", pnginfo=meta)
    tmp.replace(path)
    return path


def loss_figure(history):
    """Subject and prior loss per step (raw, faint; running mean, bold), one panel per stage ("base", "sr")."""
    from matplotlib.figure import Figure  # no pyplot: no global backend switch
    stages = [s for s in ("base", "sr") if any(h["stage"] == s for h in history)]
    fig = Figure(figsize=(5.5 * max(len(stages), 1), 3.4))
    for i, stage in enumerate(stages):
        ax = fig.add_subplot(1, len(stages), i + 1)
        hs = [h for h in history if h["stage"] == stage]
        for key, colour in (("subject", "C0"), ("prior", "C1")):
            if key not in hs[0]:
                continue
            steps, values = [h["step"] for h in hs], np.array([h[key] for h in hs])
            k = max(1, len(values) // 15)
            smooth = np.convolve(values, np.ones(k) / k, mode="valid")
            ax.plot(steps, values, color=colour, alpha=0.25, lw=0.8)
            ax.plot(steps[k - 1:], smooth, color=colour, lw=2, label=f"{key} loss")
        ax.set(title="base model (eq. 2: subject + lambda prior)" if stage == "base" else
               "super-resolution model (subject pairs)", xlabel="step", ylabel="MSE of the model's target")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    return fig


def save_loss_plot(history, path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    loss_figure(history).savefig(tmp, dpi=110, format="png")
    tmp.replace(path)
    return path
