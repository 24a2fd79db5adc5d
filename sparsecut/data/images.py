"""Safe, predictable image loading for untrusted inputs.

`load_image` turns whatever a user or a data pipeline hands us (a path, raw bytes, a binary file
object, a numpy array or a PIL image) into a fully decoded RGB `PIL.Image.Image`, or raises
`InvalidInputError` with a message a person can act on. It never lets Pillow's own exceptions
escape, and it refuses decompression bombs from the header, before any pixel is decoded.

Normalisation rules, chosen so the same input always gives the same pixels:

* Multi-frame images (animated GIF/WebP/PNG, multi-page TIFF) give their first frame.
* The EXIF orientation is applied, so the image is upright as a viewer would show it.
  Broken or out-of-range orientation data is ignored rather than failing the load.
* Transparency is composited over white.
* High-bit-depth greyscale is scaled down to 8 bits rather than clipped (see `_high_bit_depth_to_l`).
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)


class InvalidInputError(ValueError):
    """The input is not an image we can (or are willing to) load; the message says why."""


# Only these decoders are ever used on untrusted bytes. Pillow ships dozens of plugins, and the rarely
# used ones are where fuzzers keep finding bugs; EPS even shells out to Ghostscript on load. (The JPEG
# opener also yields MPO, the multi-picture JPEG many phones write; "MPO" itself is not an open format
# and naming it here makes Image.open raise KeyError.)
_PILLOW_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_SUPPORTED = "PNG, JPEG, WebP, GIF, BMP or TIFF"

_MIB = 1024 * 1024
_READ_CHUNK = _MIB

# Why white: it is what most viewers and documents show behind a transparent image, and unlike a
# checkerboard or black it adds no structure a vision model might read as content.
_BACKGROUND = (255, 255, 255)

# Pillow modes whose samples are wider than 8 bits; Pillow's own conversion to RGB clips them.
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})

# ISO-BMFF brands (bytes 8..12, after "ftyp") of formats people often upload but Pillow cannot read
# here; recognising them gives a better message than "not an image".
_HEIF_BRANDS = {
    b"heic": "HEIC",
    b"heix": "HEIC",
    b"hevc": "HEIC",
    b"heim": "HEIC",
    b"heis": "HEIC",
    b"hevm": "HEIC",
    b"hevs": "HEIC",
    b"mif1": "HEIF",
    b"msf1": "HEIF",
    b"avif": "AVIF",
    b"avis": "AVIF",
}


def load_image(
    source: str | os.PathLike[str] | bytes | bytearray | IO[bytes] | np.ndarray | Image.Image,
    *,
    max_pixels: int = 100_000_000,
    max_bytes: int = 50 * _MIB,
) -> Image.Image:
    """Load `source` as a fully decoded RGB image.

    `source` may be a path, the encoded bytes of a file, a binary file object (read from its current
    position), a uint8 numpy array shaped (H, W), (H, W, 3) or (H, W, 4), or a PIL image. A
    multi-frame PIL image is left positioned at its first frame.

    `max_pixels` bounds width × height for every kind of input; `max_bytes` bounds the encoded size
    of paths, bytes and file objects (at most `max_bytes + 1` bytes are ever read).

    The returned image is always a new object: it shares no pixels with `source` and holds no file.

    Raises:
        InvalidInputError: with a human-readable reason, for anything that is not a loadable image.
    """
    if isinstance(source, Image.Image):
        # A caller's image may still be lazily backed by a file, so it gets the same guards as bytes.
        return _to_loaded_rgb(source, max_pixels)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    return _decode(_read_source(source, max_bytes), max_pixels)


def image_summary(img: Image.Image) -> str:
    """Short description for logs and UIs, e.g. "640×480 RGB"."""
    return f"{img.width}×{img.height} {img.mode}"


# --- Getting the encoded bytes --------------------------------------------------------------------


def _read_source(source: Any, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        if len(source) > max_bytes:
            raise InvalidInputError(
                f"The file is {_format_bytes(len(source))}; the limit is {_format_bytes(max_bytes)}."
            )
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        return _read_path(source, max_bytes)
    if hasattr(source, "read"):
        return _read_stream(source, max_bytes)
    raise InvalidInputError(
        f"Cannot load an image from a {type(source).__name__}; expected a path, bytes, a binary file "
        "object, a numpy array or a PIL image."
    )


def _read_path(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    shown = repr(os.fsdecode(path))
    if os.path.isdir(path):
        raise InvalidInputError(f"{shown} is a directory, not an image file.")
    try:
        with open(path, "rb") as stream:
            return _read_stream(stream, max_bytes)
    except InvalidInputError:
        raise
    except FileNotFoundError:
        raise InvalidInputError(f"No such file: {shown}.") from None
    except PermissionError:
        raise InvalidInputError(f"Permission denied when opening {shown}.") from None
    except (OSError, ValueError) as exc:  # ValueError: e.g. an embedded NUL character in the path
        raise InvalidInputError(f"Cannot open {shown}: {exc}.") from exc


def _read_stream(stream: IO[bytes], max_bytes: int) -> bytes:
    """Read until EOF, but never more than `max_bytes + 1` bytes, so a huge stream cannot exhaust memory."""
    if isinstance(stream, io.TextIOBase):
        raise InvalidInputError("The file object is in text mode; open the file in binary mode ('rb').")
    chunks: list[bytes] = []
    total = 0
    while total <= max_bytes:
        try:
            chunk = stream.read(min(_READ_CHUNK, max_bytes + 1 - total))
        except (OSError, ValueError) as exc:  # ValueError: e.g. reading a closed file
            raise InvalidInputError(f"Could not read the file: {exc}.") from exc
        if not chunk:  # b"" at EOF; None from a non-blocking stream with nothing available
            break
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise InvalidInputError(
                f"The file object's read() returned {type(chunk).__name__}, not bytes; "
                "pass a binary file object (opened with 'rb')."
            )
        chunks.append(bytes(chunk))
        total += len(chunk)
    if total > max_bytes:
        raise InvalidInputError(f"The file is larger than the limit of {_format_bytes(max_bytes)}.")
    return b"".join(chunks)


# --- Decoding -------------------------------------------------------------------------------------


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    _reject_known_unsupported(data)
    try:
        image = Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
    except UnidentifiedImageError:
        raise InvalidInputError(
            f"The file is not an image in a supported format (got {_describe_bytes(data)}); please upload {_SUPPORTED}."
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(_bomb_message(exc, max_pixels)) from exc
    except Exception as exc:  # Pillow's plugins raise many types on malformed headers
        raise InvalidInputError(f"The image header is corrupt: {exc}") from exc
    with image:
        return _to_loaded_rgb(image, max_pixels)


def _reject_known_unsupported(data: bytes) -> None:
    if not data:
        raise InvalidInputError("The file is empty.")
    head = data[:4096].removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    # SVG is XML text: it may start with the <svg> element itself or with an XML declaration,
    # doctype or comment before it.
    if head.startswith(b"<svg") or (head.startswith((b"<?xml", b"<!doctype", b"<!--")) and b"<svg" in head):
        raise InvalidInputError(f"SVG images are not supported; please upload {_SUPPORTED}.")
    if data.startswith(b"%PDF-"):
        raise InvalidInputError(f"PDF documents are not supported; please upload {_SUPPORTED}.")
    if data[4:8] == b"ftyp" and (kind := _HEIF_BRANDS.get(data[8:12])):
        raise InvalidInputError(f"{kind} images are not supported; please upload {_SUPPORTED}.")


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.dtype != np.uint8:
        raise InvalidInputError(f"Image arrays must have dtype uint8, got {array.dtype}.")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InvalidInputError(f"Image arrays must have shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}.")
    height, width = array.shape[:2]
    _check_size(width, height, max_pixels)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def _to_loaded_rgb(image: Image.Image, max_pixels: int) -> Image.Image:
    """Decode frame 0 of a (possibly lazy) image and return it upright, as a new RGB image."""
    try:
        image.seek(0)
        # `size` comes from the header; checking it before load() is what stops a small file that
        # declares a huge canvas from allocating and decoding it.
        _check_size(image.width, image.height, max_pixels)
        image.load()
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(_bomb_message(exc, max_pixels)) from exc
    # Truncated or corrupt data surfaces as OSError, SyntaxError, struct.error, EOFError and more.
    except Exception as exc:
        raise InvalidInputError(f"The image data is truncated or corrupt and cannot be decoded ({exc}).") from exc
    upright = _apply_orientation(image)
    try:
        return _to_rgb(upright)
    except Exception as exc:
        raise InvalidInputError(f"Cannot convert a {image.mode} image to RGB ({exc}).") from exc


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Return a new, upright copy of `image` (never `image` itself, so the result owns its pixels)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # EXIF is metadata written by all sorts of software; garbage in it should not cost the user
        # their image, and showing it unrotated is the best remaining guess.
        logger.debug("Ignoring unreadable EXIF orientation", exc_info=True)
        return image.copy()


def _check_size(width: int, height: int, max_pixels: int) -> None:
    pixels = width * height
    if pixels == 0:
        raise InvalidInputError(f"The image has no pixels ({width}×{height}).")
    if pixels > max_pixels:
        raise InvalidInputError(
            f"The image is {width}×{height} = {_format_pixels(pixels)}; the limit is {_format_pixels(max_pixels)}."
        )


def _bomb_message(exc: Exception, max_pixels: int) -> str:
    # Pillow's own guard (PIL.Image.MAX_IMAGE_PIXELS, which we deliberately leave alone because it is
    # process-wide) fires inside Image.open before we can see the size, so recover the numbers from its
    # message: "Image size (N pixels) exceeds limit of M pixels, ...".
    match = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(exc))
    if match is None:
        return f"The image is too large to load safely ({exc})."
    pixels, pillow_limit = int(match[1]), int(match[2])
    limit = min(max_pixels, pillow_limit)
    return f"The image is {_format_pixels(pixels)}; the limit is {_format_pixels(limit)}."


# --- Colour normalisation -------------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparency over white. May return `image` itself."""
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        image = _high_bit_depth_to_l(image)
    elif image.mode == "La":
        image = image.convert("LA")  # Pillow converts premultiplied La only to LA
    if image.has_transparency_data:
        # convert() also resolves palette alpha and "transparency"-key (PNG tRNS) alpha.
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        flattened = Image.new("RGB", image.size, _BACKGROUND)
        flattened.paste(rgba, mask=rgba.getchannel("A"))
        return flattened
    return image if image.mode == "RGB" else image.convert("RGB")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale an I;16*, I or F image to 8-bit greyscale (L, or LA if a transparent value is declared).

    I;16 has a defined 0..65535 range and is scaled linearly from it. I and F carry no range, so we use
    the smallest conventional range the data fits in: F within 0..1 (normalised floats) is scaled from
    0..1; I or F within 0..255 is taken as 8-bit; I or F within 0..65535 as 16-bit; anything else
    (negative or larger values) is stretched from its own min..max. Non-finite floats count as 0.
    """
    samples = np.asarray(image)
    # float32 is exact for 16-bit samples; the in-place steps below keep peak memory to two copies.
    values = np.nan_to_num(samples.astype(np.float32), copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        low, high = float(values.min()), float(values.max())
        tops = (1.0, 255.0, 65535.0) if image.mode == "F" else (255.0, 65535.0)
        top = next((top for top in tops if low >= 0 and high <= top), None)
        if top is not None:
            low, high = 0.0, top
    # Scale before shifting: float32 data can span almost its whole range, so `values - low` could overflow.
    scale = 255 / (high - low) if high > low else 0.0  # a constant image maps to black
    values *= scale
    values -= low * scale
    np.clip(np.rint(values, out=values), 0, 255, out=values)
    grey = Image.fromarray(values.astype(np.uint8))
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):  # PNG tRNS on 16-bit greyscale names one fully transparent sample
        grey.putalpha(Image.fromarray(np.where(samples == transparent, 0, 255).astype(np.uint8)))
    return grey


# --- Messages -------------------------------------------------------------------------------------


def _format_bytes(n: int) -> str:
    if n < _MIB:
        return f"{n:,} bytes"
    return f"{n / _MIB:,.1f}".removesuffix(".0") + " MB"


def _format_pixels(n: int) -> str:
    if n < 100_000:
        return f"{n:,} pixels"
    megapixels = f"{n / 1_000_000:,.1f}".removesuffix(".0")
    return f"{megapixels} megapixel{'' if megapixels == '1' else 's'}"


def _describe_bytes(data: bytes) -> str:
    preview = repr(data[:16]) + ("..." if len(data) > 16 else "")
    return f"{len(data):,} byte{'' if len(data) == 1 else 's'} starting with {preview}"
