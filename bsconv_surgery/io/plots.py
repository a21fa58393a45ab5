"""PNG plots (the optional ``plot`` extra, matplotlib): ``check_plot_path`` refuses a bad or
existing target before the work; ``save_figure`` writes a figure atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from ..core.errors import SurgeryError, arg
from .files import atomic_file, check_new_file

__all__ = ["check_plot_path", "new_figure", "save_figure"]


def check_plot_path(path: Union[str, Path], force: bool = False) -> Path:
    """Refuse a path that is not ``.png``, a directory, or an existing file without ``force``;
    also fail early when matplotlib is missing."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SurgeryError(f"{arg('plot')} '{path}' must name a .png file.")
    check_new_file(path, "Plot", force)
    try:  # matplotlib: the optional 'plot' extra
        import matplotlib  # noqa: F401
    except ImportError:
        raise SurgeryError(f"{arg('plot')} needs matplotlib: pip install 'bsconv-surgery[plot]'.") from None
    return path


def new_figure(width: float = 7, height: float = 4.2) -> Any:
    """A matplotlib ``Figure`` with an Agg canvas (no pyplot, no display)."""
    # matplotlib: the optional 'plot' extra (check_plot_path said so if it is missing)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Union[str, Path], force: bool = False) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically (temporary file, rename)."""
    path = check_plot_path(path, force)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
