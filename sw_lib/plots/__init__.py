"""Figures, one module per family: detection, ablation, moe, comparison."""
from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: str | Path | None, dpi: int = 150):
    """Save `fig` to `path` (folders created) when a path is given; return the figure."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return fig
