"""Reports: figures (overlays, box plots, Dice-vs-k curves) and a self-contained HTML page.

Public API: :func:`build_report`, :class:`OverlayCase`, :func:`find_overlay_cases`.
"""

from .html import build_report
from .overlays import OverlayCase, find_overlay_cases

__all__ = ["OverlayCase", "build_report", "find_overlay_cases"]
