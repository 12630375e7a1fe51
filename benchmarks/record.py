"""One benchmark figure, as bench.py writes it to results.json and results.md.

    Record("steploop", "save blocks the step loop", 0.05, "s", "ResNet-50")
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Record:
    section: str
    name: str
    value: float | None  # None: skipped
    unit: str
    notes: str = ""
