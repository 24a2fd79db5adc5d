"""Inspecting a SparseCut model: where an answer came from in the image (`relevance`), pictures of its shortcuts
and fusion for one answer (`visuals`), and line charts of training logs (`charts`)."""

from __future__ import annotations

from .charts import line_chart
from .relevance import Relevance, answer_relevance, relevance_of_answer
from .visuals import (
    CHART_SIZE,
    VIEW_SIZE,
    InspectedAnswer,
    Visuals,
    fusion_kind,
    high_res_to_grid,
    map_row,
    neighbours_to_grid,
    overlay,
    patch_at,
    render_visuals,
    shortcut_chart,
    shortcut_label,
    shortcut_means,
    with_colour_bar,
)

__all__ = [
    "CHART_SIZE",
    "VIEW_SIZE",
    "InspectedAnswer",
    "Relevance",
    "Visuals",
    "answer_relevance",
    "fusion_kind",
    "high_res_to_grid",
    "line_chart",
    "map_row",
    "neighbours_to_grid",
    "overlay",
    "patch_at",
    "relevance_of_answer",
    "render_visuals",
    "shortcut_chart",
    "shortcut_label",
    "shortcut_means",
    "with_colour_bar",
]
