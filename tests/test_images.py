"""Tests for sparsecut.data.images: loading untrusted images safely and normalising them to upright RGB."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

import sparsecut.data.images
from sparsecut.data.images import InvalidInputError, image_summary, load_image

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
IMAGES_MODULE = Path(sparsecut.data.images.__file__)

# Small limit for the fuzz tests: a mutated header can declare any size, and decoding a canvas of up
# to the default 100 megapixels per example would make the suite slow and memory hungry.
FUZZ_MAX_PIXELS = 1_000_000


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bytes(width: int, height: int, *, idat: bytes = b"", colour_type: int = 0) -> bytes:
    """A PNG with the given header; `idat` is the already compressed pixel stream (may be empty)."""
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def noise_image(width: int = 48, height: int = 32, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 2) -> None:
    assert len(actual) == len(expected) and all(
        abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)
    ), f"{actual} != {expected}"


def rgb_at(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel((x, y))  # type: ignore[return-value]


# --- Decompression bombs and size limits ----------------------------------------------------------


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns above ~89.5 MP
@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        # Beyond 2 × PIL.Image.MAX_IMAGE_PIXELS: Pillow itself refuses inside Image.open.
        (50_000, 50_000, "The image is 2,500 megapixels; the limit is 100 megapixels."),
        # Between Pillow's limit and ours: our header check refuses it.
        (12_000, 10_000, "The image is 12000×10000 = 120 megapixels; the limit is 100 megapixels."),
    ],
)
def test_bomb_header_is_refused_before_any_pixel_is_decoded(
    monkeypatch: pytest.MonkeyPatch, width: int, height: int, expected: str
) -> None:
    loads: list[object] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    limit_before = Image.MAX_IMAGE_PIXELS

    with pytest.raises(InvalidInputError) as excinfo:
        load_image(png_bytes(width, height))

    assert str(excinfo.value) == expected
    assert loads == []
    assert Image.MAX_IMAGE_PIXELS == limit_before


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_lazily_opened_pil_bomb_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    opened = Image.open(io.BytesIO(png_bytes(12_000, 10_000)))  # Image.open reads only the header
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(InvalidInputError, match="120 megapixels; the limit is 100 megapixels"):
        load_image(opened)


def test_images_over_max_pixels_are_refused_for_every_input_kind() -> None:
    image = Image.new("RGB", (100, 50))
    expected = "The image is 100×50 = 5,000 pixels; the limit is 1,000 pixels."
    for source in (encode(image, "PNG"), image, np.zeros((50, 100, 3), np.uint8)):
        with pytest.raises(InvalidInputError) as excinfo:
            load_image(source, max_pixels=1000)
        assert str(excinfo.value) == expected
    assert load_image(image, max_pixels=5000).size == (100, 50)


def test_pillow_bomb_warning_escalated_by_caller_becomes_invalid_input() -> None:
    # 10000 × 9000 is above PIL.Image.MAX_IMAGE_PIXELS (~89.5 M), where Pillow only warns; a caller
    # running with warnings as errors must still get our exception type, not the warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(InvalidInputError, match="megapixels; the limit is 89.5 megapixels"):
            load_image(png_bytes(10_000, 9_000))


def test_valid_compressed_bomb_keeps_memory_bounded(tmp_path: Path) -> None:
    # A fully valid 8000 × 8000 RGB PNG of zeros: under 1 MB on disk, 256 MB once decoded by Pillow.
    # It runs in a fresh interpreter so the peak RSS measures this load alone.
    width = height = 8000
    compressor = zlib.compressobj(1)
    row = bytes(1 + 3 * width)  # filter byte + RGB samples
    idat = b"".join([compressor.compress(row) for _ in range(height)] + [compressor.flush()])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(width, height, idat=idat, colour_type=2))
    header_only = tmp_path / "header.png"
    header_only.write_bytes(png_bytes(50_000, 50_000))
    # The module file is loaded on its own: importing the `sparsecut` package pulls in transformers,
    # which would make this test slow and the baseline noisy.
    script = textwrap.dedent(
        f"""
        import importlib.util, resource

        spec = importlib.util.spec_from_file_location("images", {str(IMAGES_MODULE)!r})
        images = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(images)
        load_image, InvalidInputError = images.load_image, images.InvalidInputError

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for path, limit in (({str(bomb)!r}, 10_000_000), ({str(header_only)!r}, 100_000_000)):
            try:
                load_image(path, max_pixels=limit)
            except InvalidInputError:
                pass
            else:
                raise SystemExit("bomb accepted: " + path)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr + result.stdout
    growth_mb = int(result.stdout) / 1024  # ru_maxrss is in KiB on Linux
    assert growth_mb < 200


# --- Broken and unsupported files -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"])
def test_truncated_files_are_refused(fmt: str) -> None:
    data = encode(noise_image(), fmt)
    with pytest.raises(InvalidInputError, match="truncated|corrupt|not an image"):
        load_image(data[: len(data) // 2])
    # We must not have "fixed" this by letting Pillow pad truncated images, process-wide.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_pixel_data_is_refused() -> None:
    data = bytearray(encode(noise_image(), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 20] ^= 0xFF  # breaks the chunk CRC and the deflate stream
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        load_image(bytes(data))


def test_empty_input_is_refused() -> None:
    with pytest.raises(InvalidInputError, match=r"^The file is empty\.$"):
        load_image(b"")


def test_random_bytes_with_png_extension_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(np.random.default_rng(1).bytes(500))
    with pytest.raises(InvalidInputError, match="not an image in a supported format"):
        load_image(path)


def test_text_file_message_shows_what_was_received(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("hello, this is not a picture")
    with pytest.raises(InvalidInputError) as excinfo:
        load_image(str(path))
    assert str(excinfo.value) == (
        "The file is not an image in a supported format (got 28 bytes starting with b'hello, this is n'...); "
        "please upload PNG, JPEG, WebP, GIF, BMP or TIFF."
    )


@pytest.mark.parametrize(
    "svg",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"></svg>',
        b'\xef\xbb\xbf  \n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x.dtd">\n<SVG></SVG>',
        b"<!-- drawn by hand -->\n<svg></svg>",
    ],
)
def test_svg_is_refused_with_a_clear_message(svg: bytes) -> None:
    with pytest.raises(InvalidInputError) as excinfo:
        load_image(svg)
    assert str(excinfo.value) == "SVG images are not supported; please upload PNG, JPEG, WebP, GIF, BMP or TIFF."


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "PDF documents"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC images"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", "AVIF images"),
    ],
)
def test_common_unsupported_formats_are_named(data: bytes, kind: str) -> None:
    with pytest.raises(InvalidInputError, match=f"^{kind} are not supported"):
        load_image(data)


def test_formats_outside_the_allowlist_are_refused() -> None:
    # Pillow can decode ICO and PPM, but every extra decoder is extra attack surface for uploads.
    for fmt in ("ICO", "PPM"):
        with pytest.raises(InvalidInputError, match="not an image in a supported format"):
            load_image(encode(Image.new("RGB", (16, 16), RED), fmt))


# --- Multi-frame images ---------------------------------------------------------------------------


def frames() -> list[Image.Image]:
    return [Image.new("RGB", (8, 6), colour) for colour in (RED, (0, 255, 0), BLUE)]


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {}), ("TIFF", {}), ("MPO", {"quality": 95})],
)
def test_multi_frame_images_give_the_first_frame(fmt: str, params: dict[str, object]) -> None:
    first, *rest = frames()
    data = encode(first, fmt, save_all=True, append_images=rest, **params)
    with Image.open(io.BytesIO(data)) as opened:
        assert getattr(opened, "n_frames", 1) == 3  # the fixture really is multi-frame

    image = load_image(data)

    assert image.mode == "RGB" and image.size == (8, 6)
    assert_close(rgb_at(image, 4, 3), RED, tolerance=8)


def test_pil_image_positioned_on_a_later_frame_still_gives_frame_zero() -> None:
    first, *rest = frames()
    opened = Image.open(io.BytesIO(encode(first, "GIF", save_all=True, append_images=rest)))
    opened.seek(2)
    assert rgb_at(load_image(opened), 0, 0) == RED


# --- Colour modes ---------------------------------------------------------------------------------


def palette_image(transparent_index: int | None) -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([*BLUE, *RED] + [0, 0, 0] * 254)
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


MODE_CASES = [
    # (source image, expected RGB, formats it must also survive a lossless round trip through)
    pytest.param(Image.new("RGBA", (4, 4), (*RED, 0)), WHITE, ["PNG", "TIFF", "WEBP"], id="RGBA-clear"),
    pytest.param(Image.new("RGBA", (4, 4), (*RED, 255)), RED, ["PNG", "TIFF"], id="RGBA-opaque"),
    pytest.param(Image.new("RGBA", (4, 4), (*RED, 128)), (255, 127, 127), ["PNG"], id="RGBA-half"),
    pytest.param(Image.new("RGBa", (4, 4), (128, 0, 0, 128)), (255, 127, 127), [], id="RGBa"),
    pytest.param(Image.new("LA", (4, 4), (0, 0)), WHITE, ["PNG", "TIFF"], id="LA-clear"),
    pytest.param(Image.new("LA", (4, 4), (0, 255)), (0, 0, 0), ["PNG"], id="LA-opaque"),
    pytest.param(Image.new("La", (4, 4), (50, 128)), (177, 177, 177), [], id="La"),
    pytest.param(Image.new("PA", (4, 4), (1, 0)), WHITE, [], id="PA"),
    pytest.param(palette_image(transparent_index=1), WHITE, ["PNG", "GIF"], id="P-transparent"),
    pytest.param(palette_image(transparent_index=0), RED, ["PNG", "GIF"], id="P-other-index-transparent"),
    pytest.param(palette_image(transparent_index=None), RED, ["PNG", "GIF", "BMP", "TIFF"], id="P"),
    pytest.param(Image.new("L", (4, 4), 77), (77, 77, 77), ["PNG", "TIFF", "BMP"], id="L"),
    pytest.param(Image.new("1", (4, 4), 1), WHITE, ["PNG", "TIFF", "BMP"], id="1"),
    pytest.param(Image.new("I;16", (4, 4), 32768), (128, 128, 128), ["PNG", "TIFF"], id="I16-mid-grey"),
    pytest.param(Image.new("I;16", (4, 4), 65535), WHITE, ["PNG"], id="I16-white"),
    pytest.param(Image.new("I;16", (4, 4), 200), (1, 1, 1), ["PNG"], id="I16-dark-stays-dark"),
    pytest.param(Image.new("I;16B", (4, 4), 32768), (128, 128, 128), ["PNG"], id="I16B"),
    pytest.param(Image.new("I", (4, 4), 32768), (128, 128, 128), ["TIFF"], id="I-16-bit-range"),
    pytest.param(Image.new("I", (4, 4), 77), (77, 77, 77), ["TIFF"], id="I-8-bit-range"),
    pytest.param(Image.new("F", (4, 4), 0.5), (128, 128, 128), ["TIFF"], id="F-unit-range"),
    pytest.param(Image.new("F", (4, 4), 77.0), (77, 77, 77), ["TIFF"], id="F-8-bit-range"),
    pytest.param(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), RED, ["TIFF"], id="CMYK"),
    # No YCbCr round trip: Pillow 12 writes YCbCr TIFFs it cannot read back ("image file is truncated").
    pytest.param(Image.new("YCbCr", (4, 4), (76, 85, 255)), (254, 0, 0), [], id="YCbCr"),
    pytest.param(Image.new("HSV", (4, 4), (0, 255, 255)), RED, [], id="HSV"),
    pytest.param(Image.new("RGBX", (4, 4), (*RED, 0)), RED, ["TIFF"], id="RGBX"),
]


@pytest.mark.parametrize(("source", "expected", "formats"), MODE_CASES)
def test_every_mode_becomes_rgb(source: Image.Image, expected: tuple[int, int, int], formats: list[str]) -> None:
    for label, loaded in [("PIL", load_image(source))] + [(fmt, load_image(encode(source, fmt))) for fmt in formats]:
        assert loaded.mode == "RGB", label
        assert loaded.size == source.size, label
        assert_close(rgb_at(loaded, 1, 1), expected), label


def test_sixteen_bit_gradient_is_scaled_not_clipped() -> None:
    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(1, 256)
    loaded = load_image(encode(Image.fromarray(ramp), "PNG"))
    values = np.asarray(loaded)[0, :, 0].astype(int)
    assert values[0] == 0 and values[-1] == 255
    assert np.all(np.diff(values) >= 0)  # monotonic: no wrap-around or clipping plateau
    assert len(np.unique(values)) > 250


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I", [-1000, 0, 3000], [0, 64, 255]),  # outside any conventional range: stretched min..max
        ("F", [-1.0, 0.0, 3.0], [0, 64, 255]),
        ("F", [float("nan"), float("inf"), 1.0], [0, 0, 255]),  # non-finite counts as 0
        ("I", [5, 5, 5], [5, 5, 5]),
    ],
)
def test_unbounded_modes_are_scaled_predictably(mode: str, values: list[float], expected: list[int]) -> None:
    dtype = np.float32 if mode == "F" else np.int32
    image = Image.fromarray(np.array([values], dtype=dtype))
    assert image.mode == mode
    assert [rgb_at(load_image(image), x, 0)[0] for x in range(3)] == expected


def test_transparency_key_on_rgb_and_greyscale_pngs_composites_over_white() -> None:
    rgb = Image.new("RGB", (2, 1), (10, 20, 30))
    rgb.putpixel((1, 0), RED)
    loaded = load_image(encode(rgb, "PNG", transparency=(10, 20, 30)))
    assert (rgb_at(loaded, 0, 0), rgb_at(loaded, 1, 0)) == (WHITE, RED)

    deep = Image.fromarray(np.array([[7, 32768]], dtype=np.uint16))
    loaded = load_image(encode(deep, "PNG", transparency=7))
    assert rgb_at(loaded, 0, 0) == WHITE
    assert_close(rgb_at(loaded, 1, 0), (128, 128, 128), tolerance=1)


def test_caller_image_is_not_modified_or_aliased() -> None:
    source = Image.new("RGBA", (3, 3), (*RED, 0))
    load_image(source)
    assert source.mode == "RGBA" and source.getpixel((0, 0)) == (*RED, 0)

    rgb_source = Image.new("RGB", (3, 3), RED)
    loaded = load_image(rgb_source)
    assert loaded is not rgb_source
    loaded.putpixel((0, 0), BLUE)
    assert rgb_source.getpixel((0, 0)) == RED


# --- EXIF orientation -----------------------------------------------------------------------------


def marked_image() -> Image.Image:
    """40 × 20, blue, with a red top-left quadrant: every orientation moves it somewhere distinct."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 10))
    return image


# Where the stored top-left quadrant must appear once the orientation is applied, and the upright size.
# Derived from the EXIF specification, independently of Pillow's transpose table.
ORIENTATIONS = {
    1: ("top-left", (40, 20)),  # as stored
    2: ("top-right", (40, 20)),  # mirrored left-right
    3: ("bottom-right", (40, 20)),  # rotated 180°
    4: ("bottom-left", (40, 20)),  # mirrored top-bottom
    5: ("top-left", (20, 40)),  # mirrored along the main diagonal
    6: ("top-right", (20, 40)),  # needs 90° clockwise rotation
    7: ("bottom-right", (20, 40)),  # mirrored along the anti-diagonal
    8: ("bottom-left", (20, 40)),  # needs 90° counter-clockwise rotation
}


def red_corner(image: Image.Image) -> str:
    width, height = image.size
    corners = {
        "top-left": (width // 4, height // 4),
        "top-right": (3 * width // 4, height // 4),
        "bottom-left": (width // 4, 3 * height // 4),
        "bottom-right": (3 * width // 4, 3 * height // 4),
    }
    red = [name for name, xy in corners.items() if rgb_at(image, *xy)[0] > 200 and rgb_at(image, *xy)[2] < 60]
    assert len(red) == 1, red
    return red[0]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(fmt: str, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    loaded = load_image(encode(marked_image(), fmt, exif=exif, quality=95))
    corner, size = ORIENTATIONS[orientation]
    assert (red_corner(loaded), loaded.size) == (corner, size)


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_out_of_range_orientation_is_ignored(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    loaded = load_image(encode(marked_image(), "JPEG", exif=exif, quality=95))
    assert (red_corner(loaded), loaded.size) == ("top-left", (40, 20))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00garbage, not a TIFF structure at all",
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # IFD offset far past the end
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00",  # cut short
        b"\xff" * 64,
    ],
)
def test_corrupt_exif_still_loads_unrotated(exif: bytes) -> None:
    loaded = load_image(encode(marked_image(), "JPEG", exif=exif, quality=95))
    assert (red_corner(loaded), loaded.size) == ("top-left", (40, 20))


def test_pillow_warnings_escalated_to_errors_never_escape() -> None:
    # Pillow reports corrupt EXIF with a UserWarning, and its JPEG opener reads EXIF for the DPI, so a
    # caller running with warnings as errors gets the warning raised from inside Image.open. We do not
    # touch the process-wide warning filters to prevent that; the contract is only that it arrives as
    # our exception type (or, should Pillow stop warning, that the image loads).
    data = encode(marked_image(), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            loaded = load_image(data)
        except InvalidInputError:
            return
    assert loaded.size == (40, 20)


# --- Extreme sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (1, 4000), (4000, 1)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_extreme_aspect_ratios_load(size: tuple[int, int], fmt: str) -> None:
    loaded = load_image(encode(Image.new("RGB", size, RED), fmt, quality=95))
    assert loaded.mode == "RGB" and loaded.size == size
    assert_close(rgb_at(loaded, size[0] - 1, size[1] - 1), RED, tolerance=8)


def test_empty_pil_image_is_refused() -> None:
    with pytest.raises(InvalidInputError, match=r"no pixels \(0×5\)"):
        load_image(Image.new("RGB", (0, 5)))


# --- numpy arrays ---------------------------------------------------------------------------------


def test_numpy_arrays_of_supported_shapes() -> None:
    grey = np.full((3, 5), 90, np.uint8)
    assert np.array_equal(np.asarray(load_image(grey)), np.full((3, 5, 3), 90, np.uint8))

    colour = np.random.default_rng(2).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    loaded = load_image(colour)
    assert loaded.size == (5, 3) and np.array_equal(np.asarray(loaded), colour)
    colour[:] = 0  # the image must not share the caller's buffer
    assert np.asarray(loaded).any()

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (*RED, 255)
    loaded = load_image(rgba)
    assert (rgb_at(loaded, 0, 0), rgb_at(loaded, 1, 1)) == (RED, WHITE)

    strided = np.random.default_rng(3).integers(0, 256, (4, 10, 3), dtype=np.uint8)[:, ::2]
    assert np.array_equal(np.asarray(load_image(strided)), strided)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4), np.float32),
        np.zeros((4, 4, 3), np.uint16),
        np.zeros((4, 4), bool),
        np.zeros((4, 4, 3), np.int64),
        np.zeros((4, 4, 1), np.uint8),
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((4, 4, 5), np.uint8),
        np.zeros(16, np.uint8),
        np.zeros((1, 4, 4, 3), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
    ],
    ids=lambda array: f"{array.dtype}{array.shape}",
)
def test_unsupported_arrays_are_refused(array: np.ndarray) -> None:
    with pytest.raises(InvalidInputError, match="uint8|shape|no pixels"):
        load_image(array)


# --- Paths, bytes and file objects ----------------------------------------------------------------


def test_all_byte_sources_give_the_same_image(tmp_path: Path) -> None:
    data = encode(noise_image(), "PNG")
    path = tmp_path / "image.png"
    path.write_bytes(data)
    expected = np.asarray(noise_image())
    with path.open("rb") as stream:
        sources = [data, bytearray(data), str(path), path, io.BytesIO(data), stream]
        for source in sources:
            assert np.array_equal(np.asarray(load_image(source)), expected), type(source)


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "cat.png"
    with pytest.raises(InvalidInputError) as excinfo:
        load_image(missing)
    assert str(excinfo.value) == f"No such file: {str(missing)!r}."


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="is a directory"):
        load_image(tmp_path)


def test_text_mode_file_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(encode(noise_image(), "PNG"))
    with path.open(encoding="latin-1") as stream, pytest.raises(InvalidInputError, match="binary mode"):
        load_image(stream)


def test_file_object_returning_non_bytes_is_refused() -> None:
    class Reader:
        def read(self, size: int = -1) -> str:
            return "not bytes"

    with pytest.raises(InvalidInputError, match=r"read\(\) returned str, not bytes"):
        load_image(Reader())  # type: ignore[arg-type]


def test_unsupported_source_type_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="Cannot load an image from a list"):
        load_image([1, 2, 3])  # type: ignore[arg-type]


class EndlessStream(io.RawIOBase):
    """An infinite stream of zeros that counts how much was read from it."""

    def __init__(self) -> None:
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        buffer[:] = bytes(len(buffer))
        self.consumed += len(buffer)
        return len(buffer)


def test_huge_stream_is_refused_after_reading_at_most_the_limit() -> None:
    stream = EndlessStream()
    limit = 3 * 1024 * 1024
    with pytest.raises(InvalidInputError) as excinfo:
        load_image(stream, max_bytes=limit)
    assert str(excinfo.value) == "The file is larger than the limit of 3 MB."
    assert stream.consumed <= limit + 1


def test_byte_limit_applies_to_bytes_and_paths(tmp_path: Path) -> None:
    data = encode(noise_image(), "PNG")
    path = tmp_path / "image.png"
    path.write_bytes(data)
    with pytest.raises(InvalidInputError, match=rf"^The file is {len(data):,} bytes; the limit is 100 bytes\.$"):
        load_image(data, max_bytes=100)
    with pytest.raises(InvalidInputError, match="larger than the limit of 100 bytes"):
        load_image(path, max_bytes=100)
    assert load_image(path, max_bytes=len(data)).size == (48, 32)


def test_image_summary() -> None:
    assert image_summary(Image.new("RGB", (640, 480))) == "640×480 RGB"


# --- Property-based fuzzing -----------------------------------------------------------------------


def assert_rgb_or_invalid(data: bytes) -> None:
    """The contract for untrusted bytes: an upright, decoded RGB image, or InvalidInputError."""
    try:
        image = load_image(data, max_pixels=FUZZ_MAX_PIXELS)
    except InvalidInputError:
        return
    assert image.mode == "RGB"
    assert not isinstance(image, ImageFile.ImageFile)  # decoded, and holds no file
    assert len(image.tobytes()) == 3 * image.width * image.height


def seed_files() -> list[bytes]:
    image = noise_image(8, 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        encode(image, "PNG", exif=exif),
        encode(image, "JPEG", exif=exif),
        encode(image.convert("P"), "GIF", save_all=True, append_images=[image.convert("P")]),
        encode(image, "WEBP"),
        encode(image, "TIFF"),
        encode(image, "BMP"),
    ]


SEEDS = seed_files()
MAGIC_PREFIXES = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
    b"<svg",
    b"<?xml",
]
FUZZ_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.filterwarnings("ignore::UserWarning")
@FUZZ_SETTINGS
@given(prefix=st.sampled_from(MAGIC_PREFIXES), rest=st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(prefix: bytes, rest: bytes) -> None:
    # Real magic numbers steer the bytes past identification into the format parsers.
    assert_rgb_or_invalid(prefix + rest)


@st.composite
def mutated_seeds(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        operation = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if operation == "flip" and position < len(data):
            data[position] ^= draw(st.integers(1, 255))
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 8))]
        elif operation == "truncate":
            del data[position:]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")
@FUZZ_SETTINGS
@given(data=mutated_seeds())
def test_fuzz_mutated_valid_files(data: bytes) -> None:
    assert_rgb_or_invalid(data)


# Modes and the lossless formats that can store them (YCbCr: see the note in MODE_CASES).
SAVEABLE = {
    "1": ["PNG", "TIFF", "BMP"],
    "L": ["PNG", "TIFF", "BMP"],
    "LA": ["PNG", "TIFF"],
    "P": ["PNG", "GIF"],
    "RGB": ["PNG", "TIFF", "BMP"],
    "RGBA": ["PNG", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I": ["TIFF"],
    "F": ["TIFF"],
    "CMYK": ["TIFF"],
    "YCbCr": [],
    "PA": [],
    "La": [],
    "RGBa": [],
    "HSV": [],
}


@FUZZ_SETTINGS
@given(
    mode=st.sampled_from(sorted(SAVEABLE)),
    width=st.integers(1, 24),
    height=st.integers(1, 24),
    orientation=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_fuzz_generated_images(
    mode: str, width: int, height: int, orientation: int, seed: int, data: st.DataObject
) -> None:
    bands = len(Image.new(mode, (1, 1)).getbands())
    bits = {"1": 1, "I;16": 16, "I": 32, "F": 32}.get(mode, 8 * bands)
    raw = np.random.default_rng(seed).bytes((width * bits + 7) // 8 * height)
    image = Image.frombytes(mode, (width, height), raw)
    if mode.startswith("P"):
        image.putpalette(np.random.default_rng(seed).bytes(768))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    upright = (height, width) if orientation >= 5 else (width, height)

    fmt = data.draw(st.sampled_from(["PIL", *SAVEABLE[mode]]))
    source: Image.Image | bytes = image if fmt == "PIL" else encode(image, fmt, exif=exif)
    loaded = load_image(source)

    assert loaded.mode == "RGB"
    # BMP and GIF cannot carry EXIF, so only their stored size is expected.
    assert loaded.size == (upright if fmt not in ("BMP", "GIF") else (width, height))


# --- Bounded loading (fit, side, aspect ratio, decode size) -------------------------------------------------
FIT_CASES = [
    ("RGB", (200, 30, 30), (200, 30, 30)),
    ("RGBA", (200, 30, 30, 0), WHITE),
    ("LA", (0, 255), (0, 0, 0)),
    ("L", 77, (77, 77, 77)),
    ("P", 0, (0, 0, 0)),
    ("1", 1, WHITE),
    ("I;16", 32768, (128, 128, 128)),
]


@pytest.mark.parametrize(("mode", "value", "expected"), FIT_CASES, ids=[case[0] for case in FIT_CASES])
def test_fit_decodes_any_mode_straight_to_a_small_rgb_image(mode: str, value, expected) -> None:
    source = Image.new(mode, (1000, 500), value)
    for label, loaded in [("PIL", load_image(source, fit=100)), ("PNG", load_image(encode(source, "PNG"), fit=100))]:
        assert (loaded.mode, loaded.size) == ("RGB", (100, 50)), label
        assert_close(rgb_at(loaded, 50, 25), expected), label


def test_fit_keeps_the_picture_and_never_enlarges() -> None:
    marked = marked_image()  # red in the top-left quarter
    big = marked.resize((marked.width * 50, marked.height * 50), Image.Resampling.NEAREST)
    for fmt in ("PNG", "JPEG"):
        loaded = load_image(encode(big, fmt, quality=95), fit=80)
        assert loaded.size == (80, 40) and red_corner(loaded) == "top-left", fmt
    assert load_image(marked, fit=1000).size == marked.size


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_fit_applies_the_exif_orientation(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    big = marked_image().resize((400, 200), Image.Resampling.NEAREST)
    loaded = load_image(encode(big, "JPEG", exif=exif, quality=95), fit=20)
    corner, size = ORIENTATIONS[orientation]
    assert (red_corner(loaded), loaded.size) == (corner, (size[0] // 2, size[1] // 2))


def test_a_thin_image_fits_without_a_square_of_its_longest_side() -> None:
    loaded = load_image(encode(Image.new("RGB", (100_000, 1), RED), "PNG"), fit=384)
    assert loaded.size == (384, 1) and rgb_at(loaded, 100, 0) == RED


@pytest.mark.parametrize(
    ("size", "limits", "message"),
    [
        ((20_000, 10), {"max_aspect": 20}, "The image is 20000×10, 2,000 times wider than tall; the limit is 20:1"),
        ((10, 300), {"max_aspect": 20}, "30 times taller than wide"),
        ((13_000, 1000), {"max_side": 12_000}, "The image is 13000×1000; the longest side may be at most 12,000"),
    ],
)
def test_side_and_aspect_limits_are_checked_from_the_header(size, limits, message) -> None:
    with pytest.raises(InvalidInputError, match=message):
        load_image(png_bytes(*size), **limits)


@pytest.mark.parametrize(
    ("image", "fmt", "allowed"),
    [
        (Image.new("RGB", (3000, 3000)), "PNG", "8.4 megapixels"),
        (Image.new("L", (6000, 6000)), "PNG", "33.6 megapixels"),
        (Image.new("RGB", (2000, 1200)), "WEBP", "2.1 megapixels"),
        (Image.new("I;16", (2000, 1500)), "PNG", "2.8 megapixels"),
    ],
    ids=["RGB PNG", "greyscale PNG", "WebP", "16-bit PNG"],
)
def test_formats_decoded_at_full_size_are_limited_by_their_decoded_size(image, fmt, allowed) -> None:
    data = encode(image, fmt)
    with pytest.raises(InvalidInputError, match=f"may have at most {allowed} here"):
        load_image(data, fit=384, max_decode_bytes=32 * 2**20)
    assert load_image(data, fit=384).size[0] == 384  # without the limit it loads


def test_jpeg_is_decoded_at_a_reduced_scale_beyond_the_decode_limit() -> None:
    data = encode(Image.new("RGB", (6000, 4000), RED), "JPEG")
    loaded = load_image(data, fit=384, max_decode_bytes=32 * 2**20)
    assert loaded.size == (384, 256) and rgb_at(loaded, 10, 10)[0] > 240


def test_fitting_the_largest_png_within_the_limits_takes_little_memory(tmp_path: Path) -> None:
    # RGBA at 8 megapixels: 32 MB decoded. Converting or resizing it whole would take two more copies.
    path = tmp_path / "large.png"
    Image.new("RGBA", (4000, 2000), (10, 200, 10, 128)).save(path)
    script = textwrap.dedent(
        f"""
        import importlib.util, resource

        spec = importlib.util.spec_from_file_location("images", {str(IMAGES_MODULE)!r})
        images = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(images)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        image = images.load_image({str(path)!r}, fit=384, max_decode_bytes=32 * 2**20)
        assert image.size == (384, 192), image.size
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr + result.stdout
    assert int(result.stdout) / 1024 < 45  # MB: the decoded image and a strip, not three full copies
