"""Rendering of single objects (labels, receipts, pages, signs, QR codes, EAN-13) as patches."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import barcode
import numpy as np
import segno
from PIL import Image, ImageDraw, ImageFont

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/noto"))
_PRODUCTS = (
    "Organic Whole Milk", "Greek Yogurt", "Mature Cheddar", "Smoked Ham", "Fresh Pasta",
    "Orange Juice", "Basmati Rice", "Dark Chocolate", "Peanut Butter", "Rolled Oats",
    "Tomato Sauce", "Green Tea", "Butter Croissants", "Chicken Breast", "Sparkling Water",
    "Ground Coffee", "Strawberry Jam", "Wholemeal Bread", "Sea Salt Crisps", "Olive Oil",
)  # fmt: skip
_SHOPS = ("FRESH MARKET", "CORNER GROCERY", "CITY FOODS", "GREEN BASKET", "DAILY MART")
_SIGNS = (
    "OPEN", "Fresh Bread Daily", "Aisle 7 Dairy", "SALE 20% OFF", "No Entry", "Exit",
    "Deliveries", "Cold Storage", "Self Checkout", "Bakery", "Staff Only", "Returns Desk",
)  # fmt: skip
_NOTES = ("Keep refrigerated", "Store in a cool dry place", "Product of Italy", "Made in EU")
_QR_ERRORS = ("l", "m", "q", "h")


@dataclass(frozen=True)
class Patch:
    """An object drawn on its own canvas before it is warped into a frame.

    Attributes:
        image: BGR pixels, uint8, H x W x 3.
        alpha: opacity in 0..1, float32, H x W.
        region: the 4 corners (x, y) of the area that the object's box covers, in patch pixels.
        class_name: one of the detector classes.
        value: the text lines joined with newlines, or the code payload.
    """

    image: np.ndarray
    alpha: np.ndarray
    region: np.ndarray
    class_name: str
    value: str


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)


@functools.cache
def font_paths() -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """Return the (proportional, monospaced) TrueType fonts found, sorted for determinism."""
    found = sorted(p for d in FONT_DIRS if d.is_dir() for p in d.glob("*.ttf"))
    usable = [p for p in found if "Math" not in p.name and "ExtraLight" not in p.name]
    mono = tuple(p for p in usable if "Mono" in p.name)
    return tuple(p for p in usable if "Mono" not in p.name), mono


@functools.lru_cache(maxsize=256)
def _load_font(path: Path | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(path), size)


def _pick_font(
    rng: np.random.Generator, size: int, *, mono: bool = False, bold: bool | None = None
) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    proportional, monospaced = font_paths()
    pool = list(monospaced if mono else proportional)
    if bold is not None:
        pool = [p for p in pool if ("Bold" in p.name) == bold] or pool
    if not pool:
        return _load_font(None, size)
    return _load_font(pool[int(rng.integers(len(pool)))], size)


def _digits(rng: np.random.Generator, count: int) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, count))


def _letters(rng: np.random.Generator, count: int) -> str:
    return "".join(chr(65 + int(c)) for c in rng.integers(0, 26, count))


def _date(rng: np.random.Generator) -> str:
    day, month, year = int(rng.integers(1, 29)), int(rng.integers(1, 13)), int(rng.integers(25, 30))
    styles = (
        f"Best before {day:02d}/{month:02d}/20{year}",
        f"BB 20{year}-{month:02d}-{day:02d}",
        f"Use by {day:02d}.{month:02d}.20{year}",
        f"EXP {month:02d}/20{year}",
    )
    return styles[int(rng.integers(len(styles)))]


def _label_lines(rng: np.random.Generator) -> list[str]:
    amount = rng.choice(["250 g", "500 g", "1 kg", "1.5 kg", "330 ml", "750 ml", "1 L", "125 g"])
    price = f"{int(rng.integers(0, 30))}.{_digits(rng, 2)}"
    extras = [
        f"Net wt {amount}",
        f"LOT {_letters(rng, 1)}{_digits(rng, 4)}{_letters(rng, 1)}",
        _date(rng),
        rng.choice([f"EUR {price}", f"Price {price}", f"${price}", f"{price} EUR/kg"]),
        f"Batch {_digits(rng, 6)}",
        str(rng.choice(_NOTES)),
    ]
    order = rng.permutation(len(extras))[: int(rng.integers(1, 6))]
    return [str(rng.choice(_PRODUCTS)), *(extras[int(i)] for i in sorted(order))]


def _text_size(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - top)


def render_label(rng: np.random.Generator) -> Patch:
    """Render a printed product label card with 2-6 lines."""
    lines = _label_lines(rng)
    size = int(rng.integers(20, 34))
    fonts = [_pick_font(rng, int(size * 1.3), bold=True)] + [_pick_font(rng, size)] * len(lines)
    pad, gap = int(rng.integers(10, 24)), int(size * rng.uniform(0.3, 0.6))
    sizes = [_text_size(f, t) for f, t in zip(fonts, lines, strict=False)]
    width = max(w for w, _ in sizes) + 2 * pad
    height = sum(h for _, h in sizes) + gap * (len(lines) - 1) + 2 * pad
    dark = rng.random() < 0.15
    card = tuple(int(v) for v in rng.integers(0, 70, 3)) if dark else None
    card = card or tuple(int(v) for v in rng.integers(190, 256, 3))
    ink = tuple(int(v) for v in (rng.integers(215, 256, 3) if dark else rng.integers(0, 70, 3)))
    canvas = Image.new("RGB", (width, height), card)
    draw = ImageDraw.Draw(canvas)
    if rng.random() < 0.5:
        draw.rectangle((2, 2, width - 3, height - 3), outline=ink, width=2)
    y = pad
    for font, text, (_, line_height) in zip(fonts, lines, sizes, strict=False):
        left, top, _, _ = font.getbbox(text)
        draw.text((pad - left, y - top), text, font=font, fill=ink)
        y += line_height + gap
    alpha = np.ones((height, width), np.float32)
    image = np.ascontiguousarray(np.asarray(canvas)[:, :, ::-1])
    return Patch(image, alpha, _rect(0, 0, width, height), "text", "\n".join(lines))


def render_receipt(rng: np.random.Generator) -> Patch:
    """Render a long, narrow shop receipt with a monospaced font."""
    columns = int(rng.integers(24, 34))
    items = [
        (str(rng.choice(_PRODUCTS)), int(rng.integers(50, 2000)))
        for _ in range(rng.integers(3, 12))
    ]
    year, month, day = int(rng.integers(25, 28)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    stamp = f"20{year}-{month:02d}-{day:02d} {int(rng.integers(7, 22)):02d}:"
    stamp += f"{int(rng.integers(0, 60)):02d}"
    lines = [str(rng.choice(_SHOPS)), f"{int(rng.integers(1, 200))} Market Street", stamp]
    lines.append("-" * columns)
    for name, cents in items:
        price = f"{cents / 100:.2f}"
        lines.append(name[: columns - len(price) - 1].ljust(columns - len(price)) + price)
    total = f"{sum(c for _, c in items) / 100:.2f}"
    lines += ["-" * columns, "TOTAL".ljust(columns - len(total)) + total, "Thank you!"]
    font = _pick_font(rng, int(rng.integers(16, 22)), mono=True)
    line_height = int(_text_size(font, "Ag0|")[1] * rng.uniform(1.3, 1.6))
    pad = int(rng.integers(12, 24))
    width = max(_text_size(font, t)[0] for t in lines) + 2 * pad
    height = line_height * len(lines) + 2 * pad
    paper = tuple(int(v) for v in rng.integers(225, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 60, 3))
    canvas = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(canvas)
    for row, text in enumerate(lines):
        draw.text((pad, pad + row * line_height), text, font=font, fill=ink)
    image = np.ascontiguousarray(np.asarray(canvas)[:, :, ::-1])
    alpha = np.ones((height, width), np.float32)
    return Patch(image, alpha, _rect(0, 0, width, height), "text", "\n".join(lines))


def render_page(rng: np.random.Generator, width: int, height: int) -> Patch:
    """Render a width x height invoice page: a shop header, then item lines down to a total.

    The monospaced font is sized so that 24 to 32 lines fill the page, and the lines span
    about 80% to 90% of its width. On a page under about 300 pixels high the lines overlap,
    and on one under about 200 pixels wide they do not fit.
    """
    rows = int(rng.integers(24, 33))
    font = _pick_font(rng, max(8, int(height / rows / 1.45)), mono=True)
    line_height = max(1, height // rows)
    char_width = max(1.0, float(font.getlength("0")))
    columns = max(20, int(width * rng.uniform(0.80, 0.90) / char_width))
    year, month, day = int(rng.integers(25, 28)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    lines = [
        str(rng.choice(_SHOPS)),
        f"{int(rng.integers(1, 200))} Market Street",
        f"INVOICE {_digits(rng, 6)}  20{year}-{month:02d}-{day:02d}",
        "-" * columns,
    ]
    cents_total = 0
    while len(lines) < rows - 3:
        cents = int(rng.integers(50, 5000))
        cents_total += cents
        name = f"{int(rng.integers(1, 10))} x {rng.choice(_PRODUCTS)}"
        price = f"{cents / 100:.2f}"
        lines.append(name[: columns - len(price) - 1].ljust(columns - len(price)) + price)
    total = f"{cents_total / 100:.2f}"
    lines += ["-" * columns, "TOTAL".ljust(columns - len(total)) + total, "Thank you!"]
    paper = tuple(int(v) for v in rng.integers(225, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 60, 3))
    canvas = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(canvas)
    left = int((width - char_width * columns) / 2)
    for row, text in enumerate(lines):
        draw.text((left, row * line_height + line_height // 4), text, font=font, fill=ink)
    image = np.ascontiguousarray(np.asarray(canvas)[:, :, ::-1])
    alpha = np.ones((height, width), np.float32)
    return Patch(image, alpha, _rect(0, 0, width, height), "text", "\n".join(lines))


def render_sign(rng: np.random.Generator) -> Patch:
    """Render 1-2 lines of large text with no card behind them (alpha covers the glyphs only)."""
    lines = [str(t) for t in rng.choice(_SIGNS, int(rng.integers(1, 3)), replace=False)]
    font = _pick_font(rng, int(rng.integers(30, 64)), bold=bool(rng.random() < 0.6))
    sizes = [_text_size(font, t) for t in lines]
    gap, margin = int(sizes[0][1] * 0.4), 6
    width = max(w for w, _ in sizes) + 2 * margin
    height = sum(h for _, h in sizes) + gap * (len(lines) - 1) + 2 * margin
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    y = margin
    for text, (_, line_height) in zip(lines, sizes, strict=False):
        left, top, _, _ = font.getbbox(text)
        draw.text((margin - left, y - top), text, font=font, fill=255)
        y += line_height + gap
    ink = rng.integers(0, 256, 3).astype(np.uint8)
    image = np.ascontiguousarray(np.broadcast_to(ink, (height, width, 3)))
    alpha = np.asarray(mask, np.float32) / 255.0
    return Patch(image, alpha, _rect(0, 0, width, height), "text", "\n".join(lines))


def _qr_payload(rng: np.random.Generator) -> str:
    kind = int(rng.integers(4))
    if kind == 0:
        return f"https://example.com/p/{_letters(rng, 3)}{_digits(rng, int(rng.integers(3, 9)))}"
    if kind == 1:
        return f"LOT-{_digits(rng, 4)}-{_digits(rng, int(rng.integers(4, 8)))}"
    if kind == 2:
        return f"{rng.choice(_PRODUCTS)} {_date(rng)}"
    return f"https://shop.example.org/item?id={_digits(rng, int(rng.integers(6, 24)))}"


def render_qr(rng: np.random.Generator, module: int) -> Patch:
    """Render a QR code with `module` pixels per module on a white sticker with a 4-module margin.

    The region includes a 1-module quiet zone around the symbol.
    """
    payload = _qr_payload(rng)
    error = str(rng.choice(_QR_ERRORS))
    qr = segno.make_qr(payload, error=error, boost_error=False)
    dark = np.array([list(row) for row in qr.matrix], dtype=bool)
    margin = 4
    padded = np.pad(dark, margin)
    pixels = np.where(np.kron(padded, np.ones((module, module), bool)), 0, 255).astype(np.uint8)
    image = np.ascontiguousarray(np.repeat(pixels[:, :, None], 3, axis=2))
    side = dark.shape[0]
    low, high = (margin - 1) * module, (margin + side + 1) * module
    alpha = np.ones(pixels.shape, np.float32)
    return Patch(image, alpha, _rect(low, low, high, high), "qr_code", payload)


def render_ean13(rng: np.random.Generator, module: int) -> Patch:
    """Render an EAN-13 barcode with `module` pixels per module and its digits under the bars.

    The region covers the bars and the digits, including the leading digit left of the bars.
    """
    code = barcode.EAN13(_digits(rng, 12))
    digits = code.get_fullcode()
    pattern = np.array([c == "1" for c in code.build()[0]], dtype=bool)
    bar_height = int(module * rng.uniform(22, 40))
    font = _pick_font(rng, int(module * 8), mono=True)
    digit_w, digit_h = _text_size(font, "0")
    quiet_left, quiet_right, top = 11 * module, 7 * module, 3 * module
    width = quiet_left + pattern.size * module + quiet_right
    height = top + bar_height + digit_h + 4 * module
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    guards = {0, 1, 2, 45, 46, 47, 48, 49, 92, 93, 94}
    for index in np.flatnonzero(pattern):
        x = quiet_left + int(index) * module
        bottom = top + bar_height + (digit_h // 2 if int(index) in guards else 0)
        draw.rectangle((x, top, x + module - 1, bottom), fill=0)
    text_y = top + bar_height + module
    draw.text(
        (quiet_left - digit_w - 2 * module, text_y), digits[0], font=font, fill=0, anchor="lt"
    )
    for half, start in ((digits[1:7], 3), (digits[7:], 50)):
        span = 42 * module
        left = quiet_left + start * module + (span - _text_size(font, half)[0]) // 2
        draw.text((left, text_y), half, font=font, fill=0, anchor="lt")
    pixels = np.asarray(canvas)
    image = np.ascontiguousarray(np.repeat(pixels[:, :, None], 3, axis=2))
    alpha = np.ones(pixels.shape, np.float32)
    region = _rect(quiet_left - digit_w - 3 * module, top, width - quiet_right, height - module)
    return Patch(image, alpha, region, "barcode", digits)
