"""Plotly figures for the leaderboard, built from :func:`leaderboard_app.data.leaderboard` tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from kvbench.leaderboard_app.data import BASELINE, pareto_front, ratio_label

BASELINE_COLOR = "#444444"
RATIO_AXIS = "measured compression ratio (fraction of the KV cache evicted)"
MEMORY_AXIS = "memory saved = 1 − physical KV bytes / full cache (< 0: holds more)"


def colors(variants) -> dict[str, str]:
    """One stable colour per method variant (sorted names), the baseline in grey."""
    palette = qualitative.Plotly + qualitative.D3 + qualitative.Dark24
    names = sorted({v for v in variants if v != BASELINE})
    out = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    out[BASELINE] = BASELINE_COLOR
    return out


def _x_ratio(rows: pd.DataFrame) -> pd.Series:
    return rows["measured_ratio"].fillna(rows["target_ratio"])


def _x_memory(rows: pd.DataFrame) -> pd.Series:
    return rows["memory_saving"]


def _baseline_line(fig: go.Figure, board: pd.DataFrame, column: str, name: str, x_of=_x_ratio) -> None:
    full = board[board["method"] == BASELINE]
    if full.empty or pd.isna(full[column].iloc[0]):
        return
    y = float(full[column].iloc[0])
    others = x_of(board[board["method"] != BASELINE])
    left = min(float(np.nanmin(others)) if others.notna().any() else 0.0, 0.0)
    right = max(float(np.nanmax(others)) if others.notna().any() else 0.0, 0.05)
    fig.add_trace(go.Scatter(
        x=[left, right], y=[y, y], mode="lines", name=name,
        line={"dash": "dash", "color": BASELINE_COLOR, "width": 2},
        hovertemplate=f"{name}: %{{y:.3g}}<extra></extra>",
    ))


def _layout(fig: go.Figure, x_title: str, y_title: str, title: str) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0},
        xaxis_title=x_title, yaxis_title=y_title, legend_title_text="method",
        margin={"l": 10, "r": 10, "t": 50, "b": 10}, hovermode="closest", height=430,
    )
    return fig


def ratio_curves(board: pd.DataFrame, column: str, y_title: str, title: str, with_ci: bool,
                 x_of=_x_ratio, x_title: str = RATIO_AXIS, x_hover: str = "measured %{x:.3f}") -> go.Figure:
    """``column`` against the measured ratio (or ``x_of``), one line per method, the full baseline dashed."""
    fig = go.Figure()
    palette = colors(board["variant"])
    for variant, rows in board[board["method"] != BASELINE].groupby("variant", sort=True):
        rows = rows.assign(_x=x_of(rows)).sort_values("_x")
        error = None
        if with_ci:
            error = {
                "type": "data", "symmetric": False, "thickness": 1, "width": 3,
                "array": (rows["ci_high"] - rows[column]).to_numpy(),
                "arrayminus": (rows[column] - rows["ci_low"]).to_numpy(),
            }
        fig.add_trace(go.Scatter(
            x=rows["_x"], y=rows[column], mode="lines+markers", name=variant, error_y=error,
            line={"color": palette[variant]}, marker={"size": 8},
            customdata=np.column_stack([rows["target_ratio"].map(ratio_label), rows["samples"]]),
            hovertemplate=(
                f"<b>{variant}</b><br>target %{{customdata[0]}}, {x_hover}"
                f"<br>{y_title} %{{y:.3g}} (%{{customdata[1]}} samples)<extra></extra>"
            ),
        ))
    _baseline_line(fig, board, column, f"{BASELINE} (baseline)", x_of)
    return _layout(fig, x_title, y_title, title)


def score_vs_memory(board: pd.DataFrame) -> go.Figure:
    """The primary view: macro score against the memory really saved, every method where its bytes put it."""
    fig = ratio_curves(board, "score", "score", "Score against memory saved (95% bootstrap intervals)", True,
                       x_of=_x_memory, x_title=MEMORY_AXIS, x_hover="memory saved %{x:.1%}")
    fig.add_vline(x=0, line={"color": "rgba(0,0,0,0.3)", "width": 1})
    fig.update_xaxes(tickformat=".0%")
    return fig


def score_vs_ratio(board: pd.DataFrame) -> go.Figure:
    return ratio_curves(board, "score", "score", "Score against entries evicted (95% bootstrap intervals)", True)


def fidelity(board: pd.DataFrame) -> go.Figure:
    fig = ratio_curves(board, "token_match", "token match with the full cache",
                       "Fidelity: greedy tokens that match the full cache's answer", False)
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    return fig


def pareto(board: pd.DataFrame, cost: str, x_title: str, title: str, scale: float = 1.0) -> go.Figure:
    """Score against a cost, one point per (method, ratio); the non-dominated points joined up."""
    fig = go.Figure()
    palette = colors(board["variant"])
    points = board.assign(_cost=board[cost] / scale).dropna(subset=["_cost", "score"])
    for variant, rows in points.groupby("variant", sort=True):
        fig.add_trace(go.Scatter(
            x=rows["_cost"], y=rows["score"], mode="markers+text", name=variant,
            text=[ratio_label(r) for r in rows["target_ratio"]], textposition="top center",
            marker={"size": 11, "color": palette[variant],
                    "symbol": "diamond" if variant == BASELINE else "circle"},
            hovertemplate=(f"<b>{variant}</b> ratio %{{text}}<br>{x_title} %{{x:.4g}}"
                           "<br>score %{y:.3g}<extra></extra>"),
        ))
    if len(points):
        front = points[pareto_front(points["_cost"], points["score"])].sort_values("_cost")
        fig.add_trace(go.Scatter(
            x=front["_cost"], y=front["score"], mode="lines", name="Pareto front",
            line={"color": "rgba(0,0,0,0.35)", "width": 6}, hoverinfo="skip",
        ))
    return _layout(fig, x_title, "score", title)


def heatmap(matrix: pd.DataFrame, ratio: float) -> go.Figure:
    """Method × subtask scores at one ratio."""
    text = np.vectorize(lambda v: "" if np.isnan(v) else f"{v:.0f}")(matrix.to_numpy(dtype=float))
    fig = go.Figure(go.Heatmap(
        z=matrix.to_numpy(dtype=float), x=list(matrix.columns), y=list(matrix.index),
        text=text, texttemplate="%{text}", colorscale="RdYlGn", zmin=0, zmax=100,
        colorbar={"title": {"text": "score"}},
        hovertemplate="%{y} on %{x}: %{z:.1f}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        title={"text": f"Score per subtask at ratio {ratio:g} (full baseline on top)", "x": 0},
        margin={"l": 10, "r": 10, "t": 50, "b": 10}, height=max(260, 60 + 34 * len(matrix)),
    )
    return fig


def depth_heatmap(matrix: pd.DataFrame, variant: str, ratio: float | None) -> go.Figure:
    """Needle-in-a-haystack map: score over needle depth (rows, 0% on top) × context length (columns)."""
    z = matrix.to_numpy(dtype=float)
    text = np.vectorize(lambda v: "" if np.isnan(v) else f"{v:.0f}")(z) if z.size else z
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"{int(v)}" for v in matrix.columns], y=[f"{v:g}%" for v in matrix.index],
        text=text, texttemplate="%{text}", colorscale="RdYlGn", zmin=0, zmax=100,
        colorbar={"title": {"text": "score"}}, xgap=1, ygap=1,
        hovertemplate="depth %{y}, length %{x}: %{z:.1f}<extra></extra>",
    ))
    fig.update_xaxes(type="category", title_text="context length (requested tokens)")
    fig.update_yaxes(type="category", autorange="reversed", title_text="needle depth (share of the haystack)")
    fig.update_layout(
        title={"text": f"Needle in a haystack: {variant} @ {ratio_label(ratio)}", "x": 0},
        margin={"l": 10, "r": 10, "t": 50, "b": 10}, height=max(300, 80 + 30 * len(matrix)),
    )
    return fig
