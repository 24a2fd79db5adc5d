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

Bounding (for servers): `fit` scales the result down to a longest side of at most `fit` pixels while it is
decoded, so no full-size RGB copy is ever made: JPEG is decoded at a reduced scale, other formats are converted
and reduced strip by strip. `max_side`, `max_aspect` and `max_decode_bytes` refuse, from the header, images
longer, thinner or (for formats that must be decoded at full size) larger to decode than a server wants.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from typing import IO, Any, NamedTuple

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


# Formats Pillow can decode at a reduced scale (`Image.draft`): 1/2, 1/4 or 1/8 of each side.
_DRAFT_FORMATS = ("JPEG", "MPO")
_STRIP_BYTES = _MIB  # rows converted at a time when reducing an image strip by strip

# EXIF orientation -> the transpose that makes the image upright (what ImageOps.exif_transpose applies).
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class _Limits(NamedTuple):
    max_pixels: int
    max_side: int | None = None
    max_aspect: float | None = None
    max_decode_bytes: int | None = None
    fit: int | None = None


def load_image(
    source: str | os.PathLike[str] | bytes | bytearray | IO[bytes] | np.ndarray | Image.Image,
    *,
    max_pixels: int = 100_000_000,
    max_bytes: int = 50 * _MIB,
    fit: int | None = None,
    max_side: int | None = None,
    max_aspect: float | None = None,
    max_decode_bytes: int | None = None,
) -> Image.Image:
    """Load `source` as a fully decoded RGB image.

    `source` may be a path, the encoded bytes of a file, a binary file object (read from its current
    position), a uint8 numpy array shaped (H, W), (H, W, 3) or (H, W, 4), or a PIL image. A
    multi-frame PIL image is left positioned at its first frame.

    `max_pixels` bounds width × height for every kind of input; `max_bytes` bounds the encoded size
    of paths, bytes and file objects (at most `max_bytes + 1` bytes are ever read). `max_side` bounds
    the longest side, `max_aspect` the ratio of the longest side to the shortest, and
    `max_decode_bytes` the memory that decoding an image in a format that cannot be decoded at a
    reduced scale (all but JPEG) takes, estimated from its size and mode (`decode_bytes_per_pixel`).
    `fit` scales the result down (never up) to a longest side of `fit` pixels, aspect kept, without
    making a full-size RGB copy (see the module docstring).

    The returned image is always a new object: it shares no pixels with `source` and holds no file.

    Raises:
        InvalidInputError: with a human-readable reason, for anything that is not a loadable image.
    """
    limits = _Limits(max_pixels, max_side, max_aspect, max_decode_bytes, fit)
    if isinstance(source, Image.Image):
        # A caller's image may still be lazily backed by a file, so it gets the same guards as bytes.
        return _to_loaded_rgb(source, limits)
    if isinstance(source, np.ndarray):
        return _from_array(source, limits)
    return _decode(_read_source(source, max_bytes), limits)


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


def _decode(data: bytes, limits: _Limits) -> Image.Image:
    _reject_known_unsupported(data)
    try:
        image = Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
    except UnidentifiedImageError:
        raise InvalidInputError(
            f"The file is not an image in a supported format (got {_describe_bytes(data)}); please upload {_SUPPORTED}."
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(_bomb_message(exc, limits.max_pixels)) from exc
    except Exception as exc:  # Pillow's plugins raise many types on malformed headers
        raise InvalidInputError(f"The image header is corrupt: {exc}") from exc
    with image:
        return _to_loaded_rgb(image, limits)


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


def _from_array(array: np.ndarray, limits: _Limits) -> Image.Image:
    if array.dtype != np.uint8:
        raise InvalidInputError(f"Image arrays must have dtype uint8, got {array.dtype}.")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InvalidInputError(f"Image arrays must have shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}.")
    height, width = array.shape[:2]
    _check_size(width, height, limits)
    image = Image.fromarray(np.ascontiguousarray(array))
    return _fit_rgb(image, limits.fit) if limits.fit else _to_rgb(image)


def _to_loaded_rgb(image: Image.Image, limits: _Limits) -> Image.Image:
    """Decode frame 0 of a (possibly lazy) image and return it upright, as a new RGB image."""
    try:
        image.seek(0)
        # `size` comes from the header; checking it before load() is what stops a small file that
        # declares a huge canvas from allocating and decoding it.
        _check_size(image.width, image.height, limits)
        if limits.fit and image.format in _DRAFT_FORMATS:
            scale = limits.fit / max(image.size)
            if scale < 1:  # decode at 1/2, 1/4 or 1/8 scale, never below the size asked for
                image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        elif limits.max_decode_bytes is not None and image.format is not None:
            _check_decode_size(image, limits)
        image.load()
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(_bomb_message(exc, limits.max_pixels)) from exc
    # Truncated or corrupt data surfaces as OSError, SyntaxError, struct.error, EOFError and more.
    except Exception as exc:
        raise InvalidInputError(f"The image data is truncated or corrupt and cannot be decoded ({exc}).") from exc
    try:
        if limits.fit:  # reduce first, then turn upright: no full-size copy
            return _orient(_fit_rgb(image, limits.fit), _orientation(image))
        return _to_rgb(_apply_orientation(image))
    except Exception as exc:
        raise InvalidInputError(f"Cannot convert a {image.mode} image to RGB ({exc}).") from exc


def decode_bytes_per_pixel(image: Image.Image) -> int:
    """About how many bytes per pixel decoding `image` takes at full size (measured with Pillow 12: WebP's
    decoder holds two more copies; high-bit-depth samples are scaled through float32)."""
    if image.format == "WEBP":
        return 16
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        return 12
    return 1 if image.mode in ("1", "L", "P") else 4


def _check_decode_size(image: Image.Image, limits: _Limits) -> None:
    pixels = image.width * image.height
    allowed = limits.max_decode_bytes // decode_bytes_per_pixel(image)
    if pixels > allowed:
        raise InvalidInputError(
            f"The image is {image.width}×{image.height} = {_format_pixels(pixels)}; a {image.format} image in "
            f"mode {image.mode} may have at most {_format_pixels(allowed)} here (it is decoded at full size; "
            f"JPEG images may have up to {_format_pixels(limits.max_pixels)})."
        )


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:
        logger.debug("Ignoring unreadable EXIF orientation", exc_info=True)
        return 1
    return value if isinstance(value, int) else 1


def _orient(image: Image.Image, orientation: int) -> Image.Image:
    method = _ORIENTATIONS.get(orientation)
    return image if method is None else image.transpose(method)


def _fit_rgb(image: Image.Image, fit: int) -> Image.Image:
    """`image` as a new RGB image whose longest side is at most `fit` (aspect kept).

    Large images are first reduced by an integer factor with a box filter, converted to RGB a strip of rows at a
    time (each strip's rows a multiple of the factor, so the strips join exactly), then resized (bicubic) to the
    exact size: memory beyond the decoded image stays at one strip and the small result.
    """
    width, height = image.size
    factor = max(1, max(width, height) // fit)
    if factor == 1 or image.mode in _HIGH_BIT_DEPTH_MODES:  # these scale by their global range: whole
        reduced = _to_rgb(image)
        reduced = reduced if reduced is not image else image.copy()
    else:
        reduced = Image.new("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
        rows = factor * max(1, _STRIP_BYTES // (4 * width * factor))
        for top in range(0, height, rows):
            strip = _to_rgb(image.crop((0, top, width, min(height, top + rows))))
            reduced.paste(strip.reduce(factor), (0, top // factor))
    scale = fit / max(width, height)
    if scale >= 1:
        return reduced
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return reduced.resize(size, Image.Resampling.BICUBIC) if size != reduced.size else reduced


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Return a new, upright copy of `image` (never `image` itself, so the result owns its pixels)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # EXIF is metadata written by all sorts of software; garbage in it should not cost the user
        # their image, and showing it unrotated is the best remaining guess.
        logger.debug("Ignoring unreadable EXIF orientation", exc_info=True)
        return image.copy()


def _check_size(width: int, height: int, limits: _Limits) -> None:
    pixels = width * height
    if pixels == 0:
        raise InvalidInputError(f"The image has no pixels ({width}×{height}).")
    if pixels > limits.max_pixels:
        raise InvalidInputError(
            f"The image is {width}×{height} = {_format_pixels(pixels)}; "
            f"the limit is {_format_pixels(limits.max_pixels)}."
        )
    aspect = max(width, height) / min(width, height)
    if limits.max_aspect is not None and aspect > limits.max_aspect:
        shape = "wider than tall" if width > height else "taller than wide"
        raise InvalidInputError(
            f"The image is {width}×{height}, {aspect:,.0f} times {shape}; the limit is "
            f"{limits.max_aspect:g}:1 (the model would see a thin line)."
        )
    if limits.max_side is not None and max(width, height) > limits.max_side:
        raise InvalidInputError(
            f"The image is {width}×{height}; the longest side may be at most {limits.max_side:,} pixels."
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
