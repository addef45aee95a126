"""Drawing of one synthetic chest X-ray or fetal ultrasound image.

Sizes are fractions of the image side `S`, so the same image at 1024 or 128 pixels looks alike and a
shard builder that resizes keeps every pattern. The finest textures have a period of about S/16 so
they survive a resize to 64 pixels but average out at 16 pixels, where the logistic-regression
baseline in the README looks.
"""
from __future__ import annotations

import numpy as np

from data_pipeline.patterns import (Canvas, blob, grid_lines, line, ring, smooth_noise, speckle,
                                    stripes)


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def _finish(c: Canvas, noise: float) -> np.ndarray:
    """Global contrast/brightness/gamma jitter and sensor noise, then 8-bit."""
    rng = c.rng
    img = c.img * _u(rng, 0.85, 1.15) + _u(rng, -0.05, 0.05)
    img = np.clip(img, 0.0, 1.0) ** _u(rng, 0.85, 1.2)
    img += rng.normal(0.0, noise, size=img.shape).astype(np.float32)
    c.img = img
    return c.to_uint8()


# ------------------------------------------------------------------------------------ chest X-ray
def draw_cxr(findings, size: int, rng: np.random.Generator) -> np.ndarray:
    """A frontal chest X-ray stand-in of shape (size, size), uint8, with the given findings."""
    S = float(size)
    c = Canvas(size, size, rng)
    dy, dx, k = _u(rng, -0.07, 0.07) * S, _u(rng, -0.07, 0.07) * S, _u(rng, 0.88, 1.12)
    lung_r = (0.29 * S * k, 0.135 * S * k)
    lungs = [(0.47 * S + dy, 0.30 * S + dx), (0.47 * S + dy, 0.70 * S + dx)]

    c.img += 0.12
    blob(c, 0.55 * S + dy, 0.5 * S + dx, 0.46 * S * k, 0.42 * S * k, 0.40, edge=0.04 * S)  # body
    for cy, cx in lungs:
        blob(c, cy, cx, *lung_r, -0.26, edge=0.02 * S)
        stripes(c, cy, cx, 0.3 * S * k, 0.085 * S, 0.05, angle=_u(rng, 1.45, 1.7))  # ribs
    blob(c, 0.5 * S + dy, 0.5 * S + dx, 0.45 * S, 0.035 * S, 0.15, edge=0.01 * S)  # spine
    heart_rx = (_u(rng, 0.15, 0.19) if "Cardiomegaly" in findings else _u(rng, 0.09, 0.15)) * S * k
    blob(c, 0.62 * S + dy, 0.47 * S + dx, 0.11 * S * k, heart_rx, 0.18, edge=0.02 * S)
    c.img += 0.06 * smooth_noise(size, size, rng)

    def in_lung():
        cy, cx = lungs[int(rng.integers(2))]
        return cy + _u(rng, -0.55, 0.45) * lung_r[0], cx + _u(rng, -0.45, 0.45) * lung_r[1], cx

    for f in findings:
        cy, cx, lung_cx = in_lung()
        if f == "Atelectasis":
            stripes(c, cy, cx, _u(rng, 0.07, 0.1) * S, 0.06 * S, _u(rng, 0.12, 0.25), _u(rng, -0.3, 0.3))
        elif f == "Effusion":
            base = lungs[int(rng.integers(2))]
            blob(c, base[0] + lung_r[0] * _u(rng, 0.55, 0.8), base[1], _u(rng, 0.04, 0.08) * S,
                 lung_r[1] * 1.05, _u(rng, 0.08, 0.2), edge=0.02 * S)
        elif f == "Infiltration":
            speckle(c, cy, cx, _u(rng, 0.08, 0.12) * S, 0.22, _u(rng, 0.18, 0.32), dot=S / 64)
        elif f == "Mass":
            r = _u(rng, 0.05, 0.08) * S
            blob(c, cy, cx, r, r * _u(rng, 0.8, 1.2), _u(rng, 0.14, 0.28), edge=0.01 * S)
        elif f == "Nodule":
            for _ in range(int(rng.integers(1, 4))):
                cy, cx, _ = in_lung()
                r = _u(rng, 0.018, 0.03) * S
                blob(c, cy, cx, r, r, _u(rng, 0.22, 0.4), edge=0.004 * S)
        elif f == "Pneumonia":
            for _ in range(5):
                blob(c, cy + _u(rng, -0.06, 0.06) * S, cx + _u(rng, -0.05, 0.05) * S,
                     _u(rng, 0.02, 0.04) * S, _u(rng, 0.02, 0.04) * S, _u(rng, 0.06, 0.12),
                     edge=0.015 * S)
        elif f == "Pneumothorax":
            top = lungs[int(rng.integers(2))]
            side = np.sign(top[1] - 0.5 * S - dx)
            py, px = top[0] - lung_r[0] * _u(rng, 0.2, 0.6), top[1] + side * lung_r[1] * 0.45
            blob(c, py, px, 0.09 * S, 0.05 * S, -0.05, edge=0.01 * S)
            line(c, py - 0.09 * S, px - side * 0.05 * S, py + 0.09 * S, px - side * 0.05 * S,
                 0.01 * S, _u(rng, 0.2, 0.3))
        elif f == "Consolidation":
            r = _u(rng, 0.06, 0.09) * S
            blob(c, cy, cx, r, r, _u(rng, 0.2, 0.32), edge=0.015 * S)
            stripes(c, cy, cx, r * 0.8, 0.045 * S, -0.15, _u(rng, 0, np.pi))
        elif f == "Edema":  # Kerley B lines: short horizontal lines at both lateral bases
            for ly, lx in lungs:
                side = np.sign(lx - 0.5 * S - dx)
                x_edge = lx + side * lung_r[1] * 0.9
                for j in range(int(rng.integers(3, 6))):
                    y = ly + lung_r[0] * _u(rng, 0.1, 0.6)
                    line(c, y, x_edge - side * 0.07 * S, y, x_edge, 0.012 * S, _u(rng, 0.15, 0.25))
        elif f == "Emphysema":  # bullae: thin-walled dark air spaces scattered in the lungs
            for _ in range(int(rng.integers(3, 7))):
                by, bx, _ = in_lung()
                r = _u(rng, 0.02, 0.035) * S
                blob(c, by, bx, r, r, -0.12, edge=0.004 * S)
                ring(c, by, bx, r, r, 0.008 * S, 0.15)
        elif f == "Fibrosis":
            grid_lines(c, cy, cx, _u(rng, 0.08, 0.11) * S, 0.05 * S, _u(rng, 0.15, 0.25),
                       width=0.012 * S, angle=_u(rng, 0, np.pi / 2))
        elif f == "Pleural_Thickening":
            side = np.sign(lung_cx - 0.5 * S - dx)
            x = lung_cx + side * lung_r[1] * 0.95
            y = cy + _u(rng, -0.05, 0.05) * S
            line(c, y - 0.12 * S, x, y + 0.12 * S, x + side * 0.02 * S, 0.02 * S, _u(rng, 0.2, 0.3))
        elif f == "Hernia":
            hy, hx = 0.7 * S + dy + _u(rng, -0.04, 0.04) * S, 0.5 * S + dx + _u(rng, -0.08, 0.08) * S
            r = _u(rng, 0.045, 0.065) * S
            blob(c, hy, hx, r, r, -0.18, edge=0.005 * S)
            ring(c, hy, hx, r, r, 0.012 * S, _u(rng, 0.2, 0.3))
            line(c, hy, hx - r * 0.9, hy, hx + r * 0.9, 0.008 * S, 0.25)  # air-fluid level
        elif f != "Cardiomegaly":
            raise ValueError(f"no synthetic pattern for finding {f!r}")
    return _finish(c, noise=_u(rng, 0.02, 0.04))


# ----------------------------------------------------------------------------- fetal ultrasound
def draw_us(plane: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A fetal ultrasound stand-in of varying size (about 0.8 size x size), uint8."""
    h, w = int(size * _u(rng, 0.7, 0.85)), int(size * _u(rng, 0.95, 1.15))
    S = float(min(h, w))
    c = Canvas(h, w, rng)
    # Sector (fan) of speckle: apex at the top centre.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r, ang = np.hypot(yy + 0.1 * S, xx - w / 2), np.arctan2(xx - w / 2, yy + 0.1 * S)
    fan = (r < 1.05 * S) & (np.abs(ang) < 0.75)
    c.img += fan * (0.25 + 0.1 * smooth_noise(h, w, rng))
    cy, cx = _u(rng, 0.45, 0.6) * S, w / 2 + _u(rng, -0.12, 0.12) * S
    rr, th = _u(rng, 0.2, 0.28) * S, _u(rng, 0, np.pi)
    amp = _u(rng, 0.25, 0.45)
    if plane == "Fetal abdomen":
        ring(c, cy, cx, rr, rr * _u(rng, 0.85, 1.0), 0.015 * S, amp, th)
        blob(c, cy + _u(rng, -0.3, 0.3) * rr, cx + _u(rng, -0.3, 0.3) * rr, 0.06 * S, 0.04 * S, -0.2)
        line(c, cy + 0.6 * rr, cx - 0.1 * rr, cy + 0.7 * rr, cx + 0.1 * rr, 0.03 * S, amp)  # spine
    elif plane == "Fetal brain":
        ring(c, cy, cx, rr * 0.8, rr * 1.1, 0.035 * S, amp, th)
        line(c, cy - 0.7 * rr * np.cos(th), cx - 0.7 * rr * np.sin(th) * -1,
             cy + 0.7 * rr * np.cos(th), cx + 0.7 * rr * np.sin(th) * -1, 0.01 * S, amp * 0.7)
    elif plane == "Fetal femur":
        half = _u(rng, 0.15, 0.25) * S
        line(c, cy - half * np.sin(th), cx - half * np.cos(th), cy + half * np.sin(th),
             cx + half * np.cos(th), 0.035 * S, amp)
    elif plane == "Fetal thorax":
        ring(c, cy, cx, rr, rr, 0.02 * S, amp * 0.8, th)
        for dy_, dx_ in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
            blob(c, cy + dy_ * 0.2 * rr, cx + dx_ * 0.2 * rr, 0.12 * rr, 0.12 * rr, -0.2)
    elif plane == "Maternal cervix":
        half = _u(rng, 0.2, 0.3) * S
        for off in (-0.03 * S, 0.03 * S):
            line(c, cy - half * np.sin(th) + off, cx - half * np.cos(th), cy + half * np.sin(th) + off,
                 cx + half * np.cos(th), 0.015 * S, amp * 0.8)
        blob(c, cy, cx, 0.02 * S, half, -0.15, angle=th)
    elif plane == "Other":
        for _ in range(int(rng.integers(2, 5))):
            rb = _u(rng, 0.03, 0.1) * S
            blob(c, _u(rng, 0.3, 0.8) * S, w / 2 + _u(rng, -0.3, 0.3) * S, rb, rb * _u(rng, 0.5, 1.5),
                 _u(rng, -0.2, 0.3), angle=_u(rng, 0, np.pi))
    else:
        raise ValueError(f"no synthetic pattern for plane {plane!r}")
    c.img *= fan
    c.img *= rng.rayleigh(0.8, size=c.img.shape).astype(np.float32)  # multiplicative speckle
    return _finish(c, noise=0.02)
