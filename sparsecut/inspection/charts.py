"""Small charts drawn with PIL (no plotting library needed): loss curves and similar line plots."""

from __future__ import annotations

from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str = "",
    x_label: str = "",
    size: tuple[int, int] = (640, 400),
) -> Image.Image:
    """One line per named series of (x, y) points, on shared axes with min/max tick labels and a legend."""
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for values in series.values() for p in values]
    if not points:
        draw.text((left, height // 2), "no data", fill="black")
        return image
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom),
        )

    draw.rectangle((left, top, width - right, height - bottom), outline=(180, 180, 180))
    draw.text((left, 8), title, fill="black")
    draw.text((4, top), f"{y1:.3g}", fill="black")
    draw.text((4, height - bottom - 10), f"{y0:.3g}", fill="black")
    draw.text((left, height - bottom + 6), f"{x0:g}", fill="black")
    draw.text((width - right - 40, height - bottom + 6), f"{x1:g}", fill="black")
    draw.text((width // 2 - 20, height - 18), x_label, fill="black")
    for index, (name, values) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        path = [at(x, y) for x, y in values]
        if len(path) > 1:
            draw.line(path, fill=colour, width=2)
        for x, y in path if len(path) < 30 else ():
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((width - right - 150, top + 6 + 14 * index), f"— {name}", fill=colour)
    return image
