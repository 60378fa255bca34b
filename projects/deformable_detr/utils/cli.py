"""argparse value types that refuse out-of-range input at parse time, with the range in the
message (``--confidence-threshold nan`` or ``--topk 500`` fail before any work)."""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

__all__ = ["float_in", "int_in"]


def float_in(lo: float, hi: float, what: str = "", lo_open: bool = False
             ) -> Callable[[str], float]:
    """A type for a finite float in [lo, hi] ((lo, hi] with ``lo_open``); ``what`` says
    what the value does."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi):
            raise argparse.ArgumentTypeError(
                f"expected a number in {interval}{' (' + what + ')' if what else ''}, "
                f"got {text!r}")
        return v

    return parse


def int_in(lo: int, hi: Optional[int] = None, what: str = "") -> Callable[[str], int]:
    """A type for an integer in [lo, hi] (no upper bound when ``hi`` is None)."""
    interval = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(
                f"expected an integer {'in ' if hi is not None else ''}{interval}"
                f"{' (' + what + ')' if what else ''}, got {text!r}")
        return v

    return parse
