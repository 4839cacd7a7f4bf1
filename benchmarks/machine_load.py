"""The machine's load average around a benchmark, recorded in every benchmark's JSON.

The development machine is shared, so a rate means little without the load it was taken
at::

    load = LoadAverage()                      # 1, 5 and 15-minute averages now
    ... run the benchmark ...
    result["load"] = load.record()            # {"before": [1m, 5m, 15m], "after": [...]}
"""

from __future__ import annotations

import os


def load_now() -> list[float]:
    """``os.getloadavg()`` as ``[1 min, 5 min, 15 min]``, rounded to 0.01."""
    return [round(value, 2) for value in os.getloadavg()]


class LoadAverage:
    """The load average when it was made (``before``) and when :meth:`record` is called."""

    def __init__(self) -> None:
        self.before = load_now()

    def record(self) -> dict[str, list[float]]:
        return {"before": self.before, "after": load_now()}
