"""Comparisons, logical ops and selection: Equal, Greater, Less, Not, Where, ... (no gradient but Where's)."""

from __future__ import annotations
