"""One image, decoded by Pillow, as uint8 RGB: what both the in-memory folders and the streamed
ImageNet input train on.

Pillow's ``convert("RGB")`` clips a 16-bit grey image to 255 (nearly white) and a float image to
its integer part (all black), silently. So 16-bit images keep their high byte, and images whose
values have no defined 8-bit range (32-bit integer or float) are refused. Images above Pillow's
own warning size are refused too: a 13,000 × 13,000 PNG decodes at about 2.5 GB.
"""

import numpy as np
from PIL import Image

from bn_jax.datasets import DataError

MAX_PIXELS = 89_478_485  # Pillow's DecompressionBombWarning threshold (a 2.5 GB decode above ~13,000²)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def check_size(image: Image.Image, name: str) -> None:
    """Refuse an image too large to decode safely, before its pixels are read."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise DataError(f"{name}: {width}×{height} pixels exceeds the {MAX_PIXELS:,} an image may have (Pillow's "
                        "decompression-bomb limit); shrink it")


def to_rgb(image: Image.Image, name: str) -> np.ndarray:
    """``image`` (opened and loaded) as uint8 RGB, or DataError naming ``name``."""
    if image.mode in SIXTEEN_BIT:
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise DataError(f"{name}: a {kind} image has no defined 8-bit range; save it as an 8- or 16-bit image")
    return np.asarray(image.convert("RGB"), np.uint8)
