"""Read, validate, resize and encode one image for a shard.

Errors a user's data can cause (missing, empty, truncated or non-image files, images above the pixel
limit) raise `BadImage` with a reason; the shard builder records it as a reject and goes on.

Intensity mapping to 8 bits: 8-bit grayscale is kept as is; 16-bit PNG/TIFF is mapped linearly
from the full 16-bit range (`v >> 8`), which keeps absolute intensities comparable across images
(a per-image min-max stretch would not); RGB/RGBA/CMYK/palette images become luminance ('L').
An EXIF Orientation tag (JPEG, PNG, TIFF; a phone photograph of a film) is applied first, so the
image is upright as a viewer shows it.

The same functions serve the shard builder and `launcher/predict.py` (which reads the options
the shards were built with from the exported model), so a terminal sees each image exactly as
training did; nothing here imports torch.

DICOM (a `.dcm` name, any case, or the `DICM` magic after the 128-byte preamble) is read with
pydicom, single frame only, in these steps (the linear VOI transform of DICOM PS3.3 C.11.2.1.2):

1. modality rescale: `x = stored * RescaleSlope + RescaleIntercept` (1 and 0 when absent), e.g.
   Hounsfield units for CT;
2. window: centre `c` and width `w` from the `window` option when given (`--dicom-window C,W`, the
   same for every image), else the file's WindowCenter / WindowWidth (the first value when
   multi-valued; ignored when its width is below 1), else none;
3. 8 bits: with a window, `y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255` clipped to [0, 255]
   (`w = 1` is a threshold at `c - 0.5`); without one, the image's own range,
   `y = (x - min) / (max - min) * 255` (a constant image maps to 0); then rounded half up;
4. MONOCHROME1 (white = low values) is inverted, `y = 255 - y`, so bone is bright in every output.

Not applied: Modality/VOI LUT *sequences* and non-linear VOILUTFunction (SIGMOID); a file with
only those gets step 2's fallbacks. Colour DICOM (RGB, or YBR converted to RGB) becomes luminance
with no windowing. Multi-frame files are rejected (export one frame per file). Without pydicom
installed, a DICOM input raises `MissingDependency` naming the file: an environment error that
stops the build, not a reject.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Refuse decompression bombs ourselves, with a clear reason, rather than PIL's warning/exception.
Image.MAX_IMAGE_PIXELS = None


class BadImage(ValueError):
    pass


class MissingDependency(RuntimeError):
    """A library needed for this input is not installed (not the data's fault: stops the build)."""


def load_gray8(path: Path, max_pixels: int = 100_000_000,
               window: tuple[float, float] | None = None) -> Image.Image:
    """Open and fully decode an image as 8-bit grayscale ('L'); `window` = DICOM (centre, width)
    override, unused for other formats."""
    path = Path(path)
    if not path.is_file():
        raise BadImage("file not found")
    if path.stat().st_size == 0:
        raise BadImage("zero-byte file")
    if is_dicom(path):
        return load_dicom_gray8(path, max_pixels, window)
    try:
        img = Image.open(path)
        if img.width * img.height > max_pixels:
            raise BadImage(f"{img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
        img.load()  # force a full decode: truncated files fail here, not later in the loader
    except BadImage:
        raise
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError)
        raise BadImage(f"cannot decode image: {e}") from None
    img = upright(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")
    if img.mode != "L":
        img = img.convert("L")
    return img


EXIF_ORIENTATION = 0x0112


def upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF Orientation tag says (unchanged without one, or when it is 1)."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: keep the pixels as stored
        return img
    return ImageOps.exif_transpose(img) if orientation not in (1, None) else img


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def parse_window(text: str) -> tuple[float, float]:
    """`--dicom-window C,W` as (centre, width); ValueError with the reason when it is not one."""
    try:
        center, width = (float(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"expected CENTER,WIDTH (two numbers), got {text!r}") from None
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    return center, width


def dicom_identifiers(path: Path) -> dict[str, str]:
    """SOPInstanceUID and PatientID of a DICOM file (those present; {} for other files)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size == 0 or not is_dicom(path):
            return {}
        import pydicom
        ds = pydicom.dcmread(str(path), force=True, stop_before_pixels=True)
    except Exception:  # unreadable file or header, no pydicom: load_gray8 gives the reason
        return {}
    found = {key: ds.get(key) for key in ("SOPInstanceUID", "PatientID")}
    return {key: str(value) for key, value in found.items() if value not in (None, "")}


def _first(value) -> float:
    """A DICOM numeric element as one float: the first of a multi-valued one (e.g. two windows)."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0]
    return float(value)


def window_to_uint8(x: np.ndarray, center: float | None, width: float | None) -> np.ndarray:
    """Steps 2-3 of the module docstring: linear window to 8 bits (min-max when no window)."""
    if center is None or width is None:
        lo, hi = float(x.min()), float(x.max())
        if hi == lo:
            return np.zeros(x.shape, np.uint8)
        center, width = (lo + hi) / 2 + 0.5, hi - lo + 1
    if width <= 1:
        return np.where(x > center - 0.5, 255, 0).astype(np.uint8)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


def load_dicom_gray8(path: Path, max_pixels: int, window: tuple[float, float] | None) -> Image.Image:
    """A DICOM file as 8-bit grayscale, by the mapping in the module docstring."""
    try:
        import pydicom
    except ImportError:
        raise MissingDependency(f"{path}: reading DICOM needs pydicom, which is not installed "
                                f"(pip install 'pydicom>=2.4')") from None
    try:
        ds = pydicom.dcmread(str(path), force=True)  # force: some .dcm files lack the preamble
        if "PixelData" not in ds:
            raise BadImage("DICOM file has no pixel data")
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except BadImage:
        raise
    except Exception as e:  # pydicom raises InvalidDicomError, struct errors, ValueError, ...
        raise BadImage(f"cannot read DICOM: {e}") from None
    if rows * cols > max_pixels:
        raise BadImage(f"{cols}x{rows} pixels exceeds the limit of {max_pixels}")
    if frames > 1:
        raise BadImage(f"multi-frame DICOM ({frames} frames) is not supported; export one frame per file")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        pixels = ds.pixel_array
    except Exception as e:  # compressed syntax without a decoder, truncated data, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise BadImage(f"cannot decode DICOM pixel data (transfer syntax {syntax}): {e}") from None
    if int(ds.get("SamplesPerPixel", 1) or 1) == 3:
        if photometric.startswith("YBR") and int(pydicom.__version__.split(".")[0]) < 3:
            from pydicom.pixel_data_handlers.util import convert_color_space
            pixels = convert_color_space(pixels, photometric, "RGB")  # pydicom 3 does it itself
        return Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("L")  # (h, w, 3) RGB
    if pixels.ndim != 2 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise BadImage(f"unsupported DICOM image: PhotometricInterpretation {photometric}, "
                       f"pixel array shape {pixels.shape}")
    try:
        slope = _first(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = _first(ds.get("RescaleIntercept", 0.0) or 0.0)
        if window is None and ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
            window = window if window[1] >= 1 else None  # invalid in the standard: use min-max
    except (TypeError, ValueError, IndexError) as e:
        raise BadImage(f"bad DICOM rescale/window value: {e}") from None
    x = pixels.astype(np.float64) * slope + intercept
    y = window_to_uint8(x, *(window or (None, None)))
    if photometric == "MONOCHROME1":
        y = 255 - y
    return Image.fromarray(y)  # (h, w) uint8 -> 'L'


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


def as_stored(img: Image.Image, fmt: str, jpeg_quality: int = 95) -> Image.Image:
    """The image as a loader reads it back from a shard of format `fmt`: PNG and raw are lossless
    (the image itself), JPEG goes through `encode` and a decode."""
    if fmt in ("png", "raw"):
        return img
    return Image.open(io.BytesIO(encode(img, fmt, jpeg_quality))).convert("L")


def prepare(path: Path, size: int, fit: str, fmt: str, jpeg_quality: int, max_pixels: int,
            window: tuple[float, float] | None = None) -> bytes:
    return encode(fit_square(load_gray8(path, max_pixels, window), size, fit), fmt, jpeg_quality)
