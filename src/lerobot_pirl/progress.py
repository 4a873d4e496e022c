"""Progress bars that stay out of log files: drawn only on a terminal, at most once a second, and with
log lines printed above them instead of glued to them (`logging_redirect_tqdm`). Logs get INFO lines."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

MIN_REDRAW_S = 1.0  # a redraw per set_postfix would write thousands of frames into a log


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """tqdm on a terminal (stderr is a TTY), disabled otherwise."""
    kwargs.setdefault("mininterval", MIN_REDRAW_S)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", not _is_terminal())
    return tqdm(*args, **kwargs)


def _is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def duration(seconds: float) -> str:
    """`1h02m`, `3m07s` or `42s`, as a log line reads best."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
