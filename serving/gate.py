"""The promotion gate: may a challenger version replace the champion in production?

    unisrec promote --tenant crafts                              # the gate: valid ndcg@10, tolerance 0
    unisrec promote --tenant crafts --metric recall@10 --tolerance 0.005
    unisrec promote --tenant crafts --force                      # past a refusal, recorded in tags

The rule, in :func:`promotion_decision` alone (``unisrec promote`` and any later job that
promotes by itself call it): the challenger's validation metric may fall below the champion's
by at most ``tolerance``, an **absolute** drop in the metric's own units (NDCG@10 0.25 with
tolerance 0.01 lets 0.24 through, not 0.2399). With no champion (a first promotion) it
passes; a challenger that has been in production before passes (a rollback: it passed the
gate, or was forced past it, then); a challenger without the metric is refused; a champion
without it cannot be compared and the challenger passes. The metrics are the fine-tune's
``best_valid_*`` of the version's source run (a catalogue version shares its run, so it ties
with the version it extends).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from unisrec.errors import ConfigError

DEFAULT_METRIC = "ndcg@10"
DEFAULT_TOLERANCE = 0.0
METRIC_PATTERN = re.compile(r"^(recall|ndcg)@[1-9][0-9]*$")  # what a fine-tune evaluates
# Drops this small are ties: 0.25 - 0.24 is 0.010000000000000009 in floating point.
ROUNDING = 1e-9


class PromotionRefused(ConfigError):
    """The gate refused a promotion; the message is one line naming both numbers."""


@dataclass(frozen=True)
class Decision:
    """What the gate says: ``promote`` or not, and why, in one line with both numbers."""

    promote: bool
    reason: str


@dataclass(frozen=True)
class Contender:
    """One side of the comparison: a version and its validation metrics (``{"ndcg@10": ...}``)."""

    label: str  # how the reason names it, e.g. "candidate version 2"
    metrics: dict[str, float]
    was_production: bool = False  # promoted before: promoting it again is a rollback


def check_gate_options(metric: str, tolerance: float) -> None:
    """ConfigError naming ``--metric`` or ``--tolerance`` when the gate cannot use them."""
    if not METRIC_PATTERN.fullmatch(metric):
        raise ConfigError(
            f"--metric: {metric!r} is not a validation metric; use recall@K or ndcg@K "
            f"(K one of the fine-tune's eval.ks, e.g. {DEFAULT_METRIC})"
        )
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ConfigError(
            f"--tolerance: expected an absolute drop >= 0 in {metric}, got {tolerance}"
        )


def promotion_decision(
    champion: Contender | None,
    challenger: Contender,
    metric: str = DEFAULT_METRIC,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Decision:
    """Whether ``challenger`` may take production from ``champion`` (None: nothing in
    production yet): its valid ``metric`` must be at least the champion's minus
    ``tolerance`` (an absolute drop), unless it is a rollback."""
    name = f"valid {metric}"
    new = challenger.metrics.get(metric)
    if challenger.was_production:
        return Decision(True, f"{challenger.label} was in production before (a rollback)")
    if new is None:
        return Decision(False, f"{challenger.label} has no {name} to compare (its run has none)")
    if champion is None:
        return Decision(True, f"{challenger.label}: {name} {new:.6g}; no production version yet")
    old = champion.metrics.get(metric)
    if old is None:
        return Decision(
            True, f"{challenger.label}: {name} {new:.6g}; {champion.label} has none to compare"
        )
    versus = f"{challenger.label}: {name} {new:.6g} vs {champion.label}'s {old:.6g}"
    drop = old - new
    if drop > tolerance + ROUNDING:
        return Decision(False, f"{versus}, a drop of {drop:.6g} > tolerance {tolerance:g}")
    return Decision(True, f"{versus}, within tolerance {tolerance:g}")
