"""Image primitives for the synthetic stand-in datasets.

Every finding (chest X-ray) or plane (ultrasound) is drawn as a *localised* pattern (a texture or a
shape) whose position, size, orientation and contrast vary from image to image, on top of an
anatomy-like background with low-frequency "tissue" variation and sensor noise. That is what makes
the stand-ins a fair test of a CNN: a linear model on downsampled raw pixels cannot find a pattern
that moves and whose signature is a texture, while a convolutional network can.

All functions work on float32 images in [0, 1] of shape (h, w) and draw in place, touching only a
bounding box around the pattern, so a 1024x1024 image costs a few milliseconds.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "Canvas", "smooth_noise", "blob", "ring", "stripes", "speckle", "grid_lines", "line",
]


class Canvas:
    """A float image plus the random generator used to draw on it."""

    def __init__(self, h: int, w: int, rng: np.random.Generator):
        self.h, self.w, self.rng = h, w, rng
        self.img = np.zeros((h, w), dtype=np.float32)
        self.scale = min(h, w)  # sizes below are fractions of the shorter side

    def box(self, cy: float, cx: float, r: float):
        """Integer bounds and local coordinate grids (relative to the centre) of a square box."""
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, self.h)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, self.w)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        return (slice(y0, y1), slice(x0, x1)), yy - cy, xx - cx

    def to_uint8(self) -> np.ndarray:
        return (np.clip(self.img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def smooth_noise(h: int, w: int, rng: np.random.Generator, cells: int = 6) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1)).astype(np.float32)
    ys = np.linspace(0, cells, h, dtype=np.float32)
    xs = np.linspace(0, cells, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    c00 = coarse[y0][:, x0]
    c01 = coarse[y0][:, x0 + 1]
    c10 = coarse[y0 + 1][:, x0]
    c11 = coarse[y0 + 1][:, x0 + 1]
    return (c00 * (1 - fy) * (1 - fx) + c01 * (1 - fy) * fx + c10 * fy * (1 - fx) + c11 * fy * fx)


def _soft_mask(d: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (d < 0), 0 outside, with a smooth edge of width `edge` (in pixels)."""
    return np.clip(0.5 - d / max(edge, 1e-3), 0.0, 1.0)


def blob(c: Canvas, cy, cx, ry, rx, amp, angle=0.0, edge=2.0):
    """An ellipse of intensity `amp` (may be negative) with soft edges."""
    sl, yy, xx = c.box(cy, cx, max(ry, rx) + 2 * edge)
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = xx * ca + yy * sa, -xx * sa + yy * ca
    d = (np.sqrt((u / rx) ** 2 + (v / ry) ** 2) - 1.0) * min(rx, ry)
    c.img[sl] += amp * _soft_mask(d, edge)


def ring(c: Canvas, cy, cx, ry, rx, width, amp, angle=0.0):
    """An elliptical ring (skull-like outline) of given line width."""
    sl, yy, xx = c.box(cy, cx, max(ry, rx) + 2 * width)
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = xx * ca + yy * sa, -xx * sa + yy * ca
    d = np.abs(np.sqrt((u / rx) ** 2 + (v / ry) ** 2) - 1.0) * min(rx, ry)
    c.img[sl] += amp * _soft_mask(d - width / 2, 1.0)


def stripes(c: Canvas, cy, cx, r, period, amp, angle=0.0):
    """A round patch of zero-mean parallel stripes: a texture that averages out in a thumbnail."""
    sl, yy, xx = c.box(cy, cx, r)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    env = _soft_mask(np.sqrt(yy ** 2 + xx ** 2) - r, r * 0.3)
    c.img[sl] += amp * env * np.cos(2 * np.pi * u / period)


def speckle(c: Canvas, cy, cx, r, density, amp, dot=1.0):
    """A round patch of random bright and dark dots (infiltrate-like), zero mean on average."""
    sl, yy, xx = c.box(cy, cx, r)
    env = _soft_mask(np.sqrt(yy ** 2 + xx ** 2) - r, r * 0.3)
    u = c.rng.random(env.shape)
    dots = (u < density / 2).astype(np.float32) - (u > 1 - density / 2).astype(np.float32)
    if dot > 1.0:  # widen the dots a little at high resolution
        k = int(dot)
        dots = dots + np.roll(dots, k, 0)
        dots = dots + np.roll(dots, k, 1)
    c.img[sl] += amp * env * dots


def grid_lines(c: Canvas, cy, cx, r, period, amp, width=1.0, angle=0.0):
    """A round patch of crossing lines (a reticular net, fibrosis-like), made zero-mean."""
    sl, yy, xx = c.box(cy, cx, r)
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = xx * ca + yy * sa, -xx * sa + yy * ca
    du = np.abs(((u / period) + 0.5) % 1.0 - 0.5) * period
    dv = np.abs(((v / period) + 0.5) % 1.0 - 0.5) * period
    net = np.maximum(_soft_mask(du - width / 2, 1.0), _soft_mask(dv - width / 2, 1.0))
    net -= net.mean()
    env = _soft_mask(np.sqrt(yy ** 2 + xx ** 2) - r, r * 0.3)
    c.img[sl] += amp * env * net


def line(c: Canvas, y0, x0, y1, x1, width, amp):
    """A straight segment of given width (pleural line, femur shaft...)."""
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    half = np.hypot(y1 - y0, x1 - x0) / 2
    sl, yy, xx = c.box(cy, cx, half + width + 2)
    ang = np.arctan2(y1 - y0, x1 - x0)
    u = xx * np.cos(ang) + yy * np.sin(ang)
    v = -xx * np.sin(ang) + yy * np.cos(ang)
    d = np.maximum(np.abs(v) - width / 2, np.abs(u) - half)
    c.img[sl] += amp * _soft_mask(d, 1.0)
