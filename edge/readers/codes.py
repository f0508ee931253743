"""QR code and barcode reader over zbar, with retries for hard crops and exact payload bytes.

pyzbar 0.1.9's ``decode()`` cannot set scanner options, and zbar by default converts QR
payloads to UTF-8 by guessing their charset, which garbles UTF-8, Shift_JIS and binary
payloads. This module therefore drives zbar through pyzbar's ctypes bindings
(``pyzbar.wrapper``) and turns on ``ZBAR_CFG_BINARY`` (zbar >= 0.23) so that ``Code.data``
contains the bytes stored in the symbol.
"""

from __future__ import annotations

import ctypes
import logging
import math
import unicodedata
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageFilter, ImageOps

from edge.errors import ImageError, ReaderError
from edge.memory import trim_heap
from edge.readers.base import Cancellation, OpKind, Reader
from edge.results import Box, Code, Image, Reading

logger = logging.getLogger(__name__)

# Symbol types from zbar.h (enum zbar_symbol_type_e), keyed by the names pyzbar uses.
SYMBOL_TYPES: dict[str, int] = {
    "EAN2": 2,
    "EAN5": 5,
    "EAN8": 8,
    "UPCE": 9,
    "ISBN10": 10,
    "UPCA": 12,
    "EAN13": 13,
    "ISBN13": 14,
    "COMPOSITE": 15,
    "I25": 25,
    "DATABAR": 34,
    "DATABAR_EXP": 35,
    "CODABAR": 38,
    "CODE39": 39,
    "PDF417": 57,
    "QRCODE": 64,
    "SQCODE": 80,
    "CODE93": 93,
    "CODE128": 128,
}
_FORMAT_NAMES = {value: name for name, value in SYMBOL_TYPES.items()}

# Config values from zbar.h (enum zbar_config_e). ZBAR_CFG_BINARY exists since zbar 0.23;
# older versions reject it, which zbar_image_scanner_set_config reports with a non-zero result.
_CFG_ENABLE = 0
_CFG_BINARY = 4
_FOURCC_Y800 = 0x30303859  # zbar_fourcc('Y', '8', '0', '0'): 8-bit grey, one byte per pixel

# Crops whose longer side is below this are also scanned upscaled: zbar's QR finder needs
# modules of about 3 pixels or more, and small crops from a 1280x720 frame often have fewer.
_UPSCALE_TARGET_SIDE = 480
_MAX_UPSCALE = 4

# Control characters that may appear in a payload that is still treated as text.
_ALLOWED_CONTROLS = frozenset("\t\r\n\x1d")  # tab, CR, LF, GS (GS1 field separator)


@dataclass(frozen=True, slots=True)
class _Symbol:
    """One symbol as zbar reported it, with its outline in the scanned image's pixels."""

    type_id: int
    data: bytes
    points: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class _Attempt:
    """A grey image prepared for one zbar scan, and its scale relative to the input image."""

    name: str
    image: Image
    scale: float


class _Zbar:
    """The zbar functions this module calls, loaded once per process."""

    def __init__(self) -> None:
        try:
            from pyzbar import wrapper
        except ImportError as exc:
            msg = f"cannot load the zbar library through pyzbar ({exc}): install libzbar0"
            raise ReaderError(msg) from exc

        self.wrapper: Any = wrapper
        symbol_p = ctypes.POINTER(wrapper.zbar_symbol)
        self.symbol_get_type: Any = wrapper.zbar_function(
            "zbar_symbol_get_type", ctypes.c_int, symbol_p
        )
        # zbar >= 0.23 takes a third (patch) pointer; older versions ignore the extra argument.
        uint_p = ctypes.POINTER(ctypes.c_uint)
        version_fn = wrapper.zbar_function("zbar_version", ctypes.c_int, uint_p, uint_p, uint_p)
        major, minor, patch = ctypes.c_uint(0), ctypes.c_uint(0), ctypes.c_uint(0)
        version_fn(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
        self.version = (major.value, minor.value, patch.value)

        scanner = wrapper.zbar_image_scanner_create()
        try:
            status = wrapper.zbar_image_scanner_set_config(scanner, 0, _CFG_BINARY, 1)
        finally:
            wrapper.zbar_image_scanner_destroy(scanner)
        self.binary_mode: bool = status == 0
        if self.binary_mode:
            logger.debug("zbar %d.%d.%d loaded with binary mode", *self.version)
        else:
            logger.warning(
                "zbar %d.%d.%d does not support ZBAR_CFG_BINARY (needs 0.23 or later): "
                "QR payloads are zbar's charset-guessed UTF-8, not the raw bytes",
                *self.version,
            )

    def scan(self, grey: Image, symbologies: Collection[int]) -> list[_Symbol]:
        """Scan one H x W uint8 image and return every symbol found."""
        zbar = self.wrapper
        # zbar takes rows one after another in memory: a transposed view would be scrambled.
        grey = np.ascontiguousarray(grey)
        height, width = grey.shape
        scanner = zbar.zbar_image_scanner_create()
        image = zbar.zbar_image_create()
        try:
            if symbologies:
                zbar.zbar_image_scanner_set_config(scanner, 0, _CFG_ENABLE, 0)
                for type_id in symbologies:
                    zbar.zbar_image_scanner_set_config(scanner, type_id, _CFG_ENABLE, 1)
            if self.binary_mode:
                zbar.zbar_image_scanner_set_config(scanner, 0, _CFG_BINARY, 1)
            zbar.zbar_image_set_format(image, _FOURCC_Y800)
            zbar.zbar_image_set_size(image, width, height)
            # zbar reads the pixels in place during zbar_scan_image, so grey stays referenced.
            zbar.zbar_image_set_data(image, grey.ctypes.data, grey.nbytes, None)
            if zbar.zbar_scan_image(scanner, image) <= 0:
                return []
            return self._collect(image)
        finally:
            zbar.zbar_image_destroy(image)
            zbar.zbar_image_scanner_destroy(scanner)

    def _collect(self, image: Any) -> list[_Symbol]:
        zbar = self.wrapper
        symbols: list[_Symbol] = []
        symbol = zbar.zbar_image_first_symbol(image)
        while symbol:
            length = zbar.zbar_symbol_get_data_length(symbol)
            data = ctypes.string_at(zbar.zbar_symbol_get_data(symbol), length)
            points = tuple(
                (zbar.zbar_symbol_get_loc_x(symbol, i), zbar.zbar_symbol_get_loc_y(symbol, i))
                for i in range(zbar.zbar_symbol_get_loc_size(symbol))
            )
            symbols.append(_Symbol(self.symbol_get_type(symbol), data, points))
            symbol = zbar.zbar_symbol_next(symbol)
        return symbols


_zbar: _Zbar | None = None


def _get_zbar() -> _Zbar:
    global _zbar
    if _zbar is None:
        _zbar = _Zbar()
    return _zbar


def zbar_binary_mode() -> bool:
    """Return whether the loaded zbar returns raw QR bytes (``ZBAR_CFG_BINARY``, zbar >= 0.23).

    Raises:
        ReaderError: If the zbar library cannot be loaded.
    """
    return _get_zbar().binary_mode


def payload_text(data: bytes) -> str | None:
    """Decode a payload to text, or return ``None`` when it is not clean text.

    The rule, in order:

    1. Valid UTF-8 is text (ASCII included).
    2. Otherwise valid Shift_JIS is text if it contains at least one Japanese character
       (kana, kanji, half-width katakana or a full-width form). QR codes store kanji-mode
       segments as Shift_JIS, and Japanese generators often write byte segments in it too.
    3. Anything else is binary: ``None``.

    Text that contains a C0 control character other than tab, CR, LF or GS (the GS1 field
    separator), a C1 control or DEL is also treated as binary. Such bytes rarely belong to
    text, and they would corrupt logs and JSON consumers.

    NOTE: ECI designators are not visible through zbar's binary mode, so an ISO-8859-1
    payload with accented letters is reported as binary rather than as Latin-1 text.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = data.decode("shift_jis")
        except UnicodeDecodeError:
            return None
        if not any(_is_japanese(char) for char in text):
            return None
    if any(_is_control(char) for char in text):
        return None
    return text


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc" and char not in _ALLOWED_CONTROLS


def _is_japanese(char: str) -> bool:
    code = ord(char)
    return (
        0x3040 <= code <= 0x30FF  # hiragana, katakana
        or 0x3400 <= code <= 0x9FFF  # CJK ideographs (kanji)
        or 0xFF01 <= code <= 0xFF9F  # full-width forms, half-width katakana
        or 0x3000 <= code <= 0x303F  # CJK punctuation
    )


# BT.601 luma weights in B, G, R order, for Pillow's RGB-to-L matrix: Pillow takes the
# first channel as red, and frames are BGR.
_BGR_LUMA = (0.114, 0.587, 0.299, 0.0)
_GREY_BAND_ROWS = 128


def to_grey(image: Image) -> Image:
    """Convert a BGR, BGRA or grey uint8 image to a C-contiguous H x W grey image.

    Colour is weighted as in ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B), as OpenCV's
    ``COLOR_BGR2GRAY`` does.

    Raises:
        ImageError: If the image is not uint8, is empty, or has a channel count other than
            1, 3 or 4.
    """
    if image.dtype != np.uint8:
        msg = f"code reader needs a uint8 image, got dtype {image.dtype}: convert it first"
        raise ImageError(msg)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.size == 0:
        msg = f"code reader needs at least 1 x 1 pixels, got shape {image.shape}"
        raise ImageError(msg)
    if image.ndim == 2:
        return np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        colour = image[:, :, :3]
        height, width = int(image.shape[0]), int(image.shape[1])
        grey = np.empty((height, width), dtype=np.uint8)
        # Band by band: Pillow stores an RGB image in 4 bytes per pixel, so converting a
        # 2481 x 993 receipt scan at once took about 12 MB more.
        for top in range(0, height, _GREY_BAND_ROWS):
            band = PILImage.fromarray(np.ascontiguousarray(colour[top : top + _GREY_BAND_ROWS]))
            grey[top : top + _GREY_BAND_ROWS] = np.asarray(band.convert("L", _BGR_LUMA))
        return grey
    msg = f"code reader needs an H x W grey, BGR or BGRA image, got shape {image.shape}"
    raise ImageError(msg)


# The retries below prepare images with Pillow and NumPy rather than OpenCV, so that the
# worker processes that run this reader do not load OpenCV, which took about 17 MB of
# resident memory in each of them (x86-64).


def _pil(grey: Image) -> PILImage.Image:
    return PILImage.fromarray(grey)


def _array(image: PILImage.Image) -> Image:
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _darkest_channel(image: Image) -> Image | None:
    """Return the per-pixel minimum over colour channels, or ``None`` for grey input.

    Codes printed in a light colour (yellow, cyan) nearly vanish in a luma conversion but
    stay dark in at least one channel.
    """
    if image.ndim != 3 or image.shape[2] < 3:
        return None
    # Two element-wise minima: min(axis=2) took about 25 times as long on the corpus codes.
    darkest = np.minimum(np.minimum(image[:, :, 0], image[:, :, 1]), image[:, :, 2])
    # The minima keep the input's memory order, which is column-major for a transposed view.
    return np.ascontiguousarray(darkest, dtype=np.uint8)


def _upscale_factor(grey: Image) -> int:
    longer = max(grey.shape)
    if longer >= _UPSCALE_TARGET_SIDE:
        return 1
    return min(_MAX_UPSCALE, math.ceil(_UPSCALE_TARGET_SIDE / int(longer)))


def _resize(grey: Image, factor: int) -> Image:
    if factor == 1:
        return grey
    height, width = grey.shape
    size = (width * factor, height * factor)
    return _array(_pil(grey).resize(size, PILImage.Resampling.BICUBIC))


# The binomial 1-2-1 kernel, which OpenCV's GaussianBlur uses for a 3 x 3 kernel with sigma
# 0, to take pixel noise off before a global threshold.
_SMOOTH = ImageFilter.Kernel((3, 3), (1, 2, 1, 2, 4, 2, 1, 2, 1), scale=16)


def _otsu_level(grey: Image) -> int:
    """Return Otsu's threshold: the level that best splits the histogram into two classes."""
    counts = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    below = np.cumsum(counts)
    above = below[-1] - below
    sum_below = np.cumsum(counts * levels)
    sum_above = sum_below[-1] - sum_below
    with np.errstate(divide="ignore", invalid="ignore"):
        between = below * above * (sum_below / below - sum_above / above) ** 2
    return int(np.argmax(np.nan_to_num(between, nan=-1.0)))


def _otsu(grey: Image) -> Image:
    # Pillow's filter leaves the outermost pixels as they are, so the image is padded with
    # its reflection first, as OpenCV's filters do at the border. A side of one pixel has
    # nothing to reflect, so its pixel is repeated.
    if min(grey.shape) > 1:
        padded = np.pad(grey, 1, mode="reflect")
    else:
        padded = np.pad(grey, 1, mode="edge")
    blurred = _array(_pil(padded).filter(_SMOOTH))[1:-1, 1:-1]
    level = _otsu_level(blurred)
    return np.where(blurred > level, np.uint8(255), np.uint8(0))


def _adaptive(grey: Image) -> Image:
    # White where a pixel is brighter than the Gaussian-weighted mean of its block minus 5.
    # The block must span a few QR modules: about 1/8 of the shorter side, odd, at least 11.
    # Its sigma is the one OpenCV derives for a kernel of that size. Pillow's blur
    # approximates that Gaussian with box blurs.
    block = max(11, (min(grey.shape) // 8) | 1)
    sigma = 0.3 * ((block - 1) * 0.5 - 1) + 0.8
    mean = np.asarray(_pil(grey).filter(ImageFilter.GaussianBlur(sigma)), dtype=np.int16)
    return np.where(grey.astype(np.int16) > mean - 5, np.uint8(255), np.uint8(0))


def _equalise(grey: Image) -> Image:
    return _array(ImageOps.equalize(_pil(grey)))


def _invert(grey: Image) -> Image:
    return np.invert(grey)


def _median(grey: Image) -> Image:
    return _array(_pil(grey).filter(ImageFilter.MedianFilter(3)))


def _attempts(image: Image, *, try_harder: bool) -> Iterator[_Attempt]:
    """Yield prepared images, cheapest and most likely first, building each only when needed."""
    grey = to_grey(image)
    factor = _upscale_factor(grey)
    yield _Attempt("grey", grey, 1.0)

    # Upscale the source once and derive each retry from it, so that thresholds and inversion
    # also run at a size zbar can resolve.
    base = _resize(grey, factor)
    if factor > 1:
        yield _Attempt(f"upscaled x{factor}", base, float(factor))

    transforms: list[tuple[str, Callable[[Image], Image]]] = [
        ("inverted", _invert),
        ("equalised", _equalise),
        ("otsu", _otsu),
        ("adaptive threshold", _adaptive),
        ("inverted otsu", lambda img: _invert(_otsu(img))),
    ]
    for name, transform in transforms:
        yield _Attempt(name, transform(base), float(factor))

    darkest = _darkest_channel(image)
    if darkest is not None:
        yield _Attempt("darkest channel", _resize(darkest, factor), float(factor))

    if try_harder:
        # Larger modules and a bit of blur help with dense codes and JPEG or moire noise.
        bigger = factor * 2 if factor * 2 <= _MAX_UPSCALE * 2 else factor
        if bigger != factor:
            yield _Attempt(f"upscaled x{bigger}", _resize(grey, bigger), float(bigger))
        yield _Attempt("median blurred", _median(base), float(factor))
        yield _Attempt("inverted adaptive", _invert(_adaptive(base)), float(factor))


def _symbol_box(points: tuple[tuple[int, int], ...], scale: float, shape: tuple[int, ...]) -> Box:
    height, width = shape[0], shape[1]
    xs = [p[0] / scale for p in points]
    ys = [p[1] / scale for p in points]
    left = min(max(math.floor(min(xs)), 0), width)
    top = min(max(math.floor(min(ys)), 0), height)
    right = min(max(math.ceil(max(xs)), left), width)
    bottom = min(max(math.ceil(max(ys)), top), height)
    return Box(left, top, right - left, bottom - top)


def _to_codes(symbols: list[_Symbol], attempt: _Attempt, shape: tuple[int, ...]) -> list[Code]:
    codes = []
    for symbol in symbols:
        box = _symbol_box(symbol.points, attempt.scale, shape) if symbol.points else None
        name = _FORMAT_NAMES.get(symbol.type_id, f"ZBAR{symbol.type_id}")
        codes.append(Code(format=name, data=symbol.data, text=payload_text(symbol.data), box=box))
    return codes


def decode_codes(
    image: Image,
    *,
    symbologies: Collection[str] = (),
    try_harder: bool = False,
    retries: bool = True,
) -> Reading:
    """Decode the QR codes and barcodes in an image with zbar.

    Scans the grey image, then retries in order on an upscaled copy (small crops), an
    inverted copy (light-on-dark codes), a histogram-equalised copy, Otsu and adaptive
    thresholds (low contrast, uneven light) and the darkest colour channel (light-coloured
    codes). Symbols found by more than one scan are reported once.

    Args:
        image: H x W x 3 BGR, H x W x 4 BGRA or H x W grey, uint8, any size from 1 x 1.
        symbologies: Format names (``"QRCODE"``, ``"EAN13"``, see :data:`SYMBOL_TYPES`) to
            enable; empty enables zbar's default set.
        try_harder: Run every retry and merge the results instead of stopping at the
            first scan that finds a symbol, and add larger upscales and denoised copies.
            Slower, by up to about ten zbar scans per image.
        retries: Run the retries when the first scan finds nothing. Without them the image
            is scanned once, as plain zbar would.

    Returns:
        The codes found, with boxes in ``image`` pixels; an empty reading if none.

    Raises:
        ImageError: If the image has an unsupported dtype, shape or channel count.
        ReaderError: If the zbar library cannot be loaded.
        ValueError: If a symbology name is unknown, or ``try_harder`` is set without
            ``retries``.
    """
    if try_harder and not retries:
        msg = "try_harder runs every retry, so it needs retries=True"
        raise ValueError(msg)
    type_ids = _symbology_ids(symbologies)
    zbar = _get_zbar()
    found: dict[tuple[str, bytes], Code] = {}
    for attempt in _attempts(image, try_harder=try_harder):
        symbols = zbar.scan(attempt.image, type_ids)
        for code in _to_codes(symbols, attempt, image.shape):
            found.setdefault((code.format, code.data), code)
        if symbols:
            logger.debug("zbar found %d symbols on the %s image", len(symbols), attempt.name)
            if not try_harder:
                break
        if not retries:
            break
    return Reading(codes=tuple(found.values()))


def _symbology_ids(names: Collection[str]) -> tuple[int, ...]:
    unknown = sorted(name for name in names if name not in SYMBOL_TYPES)
    if unknown:
        msg = f"unknown symbologies {unknown}: use names from {sorted(SYMBOL_TYPES)}"
        raise ValueError(msg)
    return tuple(SYMBOL_TYPES[name] for name in names)


class CodeReader(Reader):
    """Reads QR codes and barcodes with zbar, in a killable worker process.

    The instance holds only its options, so it pickles cheaply into each call. The zbar
    library is loaded on the first read in each process.

    Args:
        symbologies: Format names to enable (``"QRCODE"``, ``"EAN13"``, ...); empty enables
            zbar's default set (all 1D and 2D codes it supports).
        try_harder: Run every retry and merge results (see :func:`decode_codes`).
        retry_max_pixels: Images with more pixels are scanned once, without the retries
            on prepared copies (see :func:`decode_codes`), which cost up to six more scans.
            ``None`` retries on every image. The pipeline's full-frame decode sets it, so
            that a large frame is scanned once, as plain zbar would.
    """

    name = "codes"
    kind: OpKind = "process"
    # zbar needs the quiet zone beside a symbol (about ten modules for EAN-13), which a tight
    # detector box cuts off. On the bundled distorted samples 0.06 missed codes that 0.3 read.
    crop_margin = 0.3
    # zbar with its retries took about 0.14 ms per thousand pixels on a full 1280 x 720
    # frame, against about 2.75 ms for OCR of text crops (edge bench, 2-core x86-64).
    cost_per_pixel = 0.05

    def __init__(
        self,
        *,
        symbologies: Collection[str] = (),
        try_harder: bool = False,
        retry_max_pixels: int | None = None,
    ) -> None:
        _symbology_ids(symbologies)
        if retry_max_pixels is not None and retry_max_pixels < 0:
            msg = f"retry_max_pixels must be 0 or more, got {retry_max_pixels}"
            raise ValueError(msg)
        self.symbologies = tuple(symbologies)
        self.try_harder = try_harder
        self.retry_max_pixels = retry_max_pixels

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        """Decode the codes in a crop; boxes are in crop pixels.

        ``cancellation`` is ignored: a hung decode is stopped by killing its worker process.
        """
        try:
            retries = (
                self.retry_max_pixels is None
                or image.shape[0] * image.shape[1] <= self.retry_max_pixels
            )
            return decode_codes(
                image,
                symbologies=self.symbologies,
                try_harder=self.try_harder and retries,
                retries=retries,
            )
        finally:
            # The worker process lives on between reads: without this it keeps the heap of
            # its largest decode (a full 1920 x 1080 frame with retries, about 25 MB).
            trim_heap()

    def warm_up(self) -> None:
        """Load zbar and scan one blank image."""
        decode_codes(np.full((32, 32), 255, dtype=np.uint8))

    def __repr__(self) -> str:
        return (
            f"CodeReader(symbologies={self.symbologies!r}, try_harder={self.try_harder!r}, "
            f"retry_max_pixels={self.retry_max_pixels!r})"
        )
