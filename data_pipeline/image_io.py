"""Read, validate, resize and encode one image for a shard.

Errors a user's data can cause (missing, empty, truncated or non-image files, images above the pixel
limit) raise `BadImage` with a reason; the shard builder records it as a reject and goes on.

Intensity mapping to 8 bits: 8-bit grayscale is kept as is; 16-bit PNG/TIFF is mapped linearly
from the full 16-bit range (`v >> 8`), which keeps absolute intensities comparable across images
(a per-image min-max stretch would not); RGB/RGBA/palette images become luminance ('L').
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# Refuse decompression bombs ourselves, with a clear reason, rather than PIL's warning/exception.
Image.MAX_IMAGE_PIXELS = None


class BadImage(ValueError):
    pass


def load_gray8(path: Path, max_pixels: int = 100_000_000) -> Image.Image:
    """Open and fully decode an image as 8-bit grayscale ('L')."""
    path = Path(path)
    if not path.is_file():
        raise BadImage("file not found")
    if path.stat().st_size == 0:
        raise BadImage("zero-byte file")
    try:
        img = Image.open(path)
        if img.width * img.height > max_pixels:
            raise BadImage(f"{img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
        img.load()  # force a full decode: truncated files fail here, not later in the loader
    except BadImage:
        raise
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError)
        raise BadImage(f"cannot decode image: {e}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")
    if img.mode != "L":
        img = img.convert("L")
    return img


def fit_square(img: Image.Image, size: int, fit: str = "pad") -> Image.Image:
    """Resize to size x size with antialiasing; `pad` keeps the aspect ratio (black borders),
    `crop` takes the centre square, `stretch` ignores the aspect ratio."""
    w, h = img.size
    if fit == "stretch" or w == h:
        return img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if fit == "crop":
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        return img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if fit != "pad":
        raise ValueError(f"fit must be pad, crop or stretch, got {fit!r}")
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(small, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def encode(img: Image.Image, fmt: str, jpeg_quality: int = 95) -> bytes:
    """Encode deterministically: png (lossless), jpeg (GPU-decodable by DALI), raw (uint8 bytes)."""
    if fmt == "raw":
        return np.asarray(img, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=3)
    elif fmt == "jpeg":
        img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0, optimize=False)
    else:
        raise ValueError(f"format must be png, jpeg or raw, got {fmt!r}")
    return buf.getvalue()


def prepare(path: Path, size: int, fit: str, fmt: str, jpeg_quality: int, max_pixels: int) -> bytes:
    return encode(fit_square(load_gray8(path, max_pixels), size, fit), fmt, jpeg_quality)
