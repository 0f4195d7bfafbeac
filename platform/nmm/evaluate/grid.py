"""A PNG grid of images (rows × columns), upscaled with nearest-neighbour for viewing."""

from __future__ import annotations

import io

import numpy as np


def png_grid(images: np.ndarray, rows: int, cols: int, scale: int = 4, pad: int = 1) -> bytes:
    from PIL import Image

    n, h, w, c = images.shape
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
    for i in range(min(n, rows * cols)):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y : y + h, x : x + w] = images[i]
    pixels = (np.clip(canvas, 0, 1) * 255).astype(np.uint8)
    img = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
