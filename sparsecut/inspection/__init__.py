"""Inspecting a SparseCut model: pictures of its shortcuts and fusion for one answer (`visuals`), and line
charts of training logs (`charts`)."""

from __future__ import annotations

from .charts import line_chart
from .visuals import (
    CHART_SIZE,
    VIEW_SIZE,
    InspectedAnswer,
    Visuals,
    fusion_kind,
    high_res_to_grid,
    neighbours_to_grid,
    overlay,
    patch_at,
    render_visuals,
    shortcut_chart,
    shortcut_label,
    shortcut_means,
)

__all__ = [
    "CHART_SIZE",
    "VIEW_SIZE",
    "InspectedAnswer",
    "Visuals",
    "fusion_kind",
    "high_res_to_grid",
    "line_chart",
    "neighbours_to_grid",
    "overlay",
    "patch_at",
    "render_visuals",
    "shortcut_chart",
    "shortcut_label",
    "shortcut_means",
]
