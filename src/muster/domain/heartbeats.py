"""The heartbeat interval a fleet is told, as Nomad sets it: the whole platform is held to a
heartbeat budget (heartbeats per second), so a larger fleet heartbeats less often. Pure (no
store): the settings (muster.config) read its defaults, liveness (muster.domain.liveness) applies
it."""

from __future__ import annotations

import math

# The heartbeats per second the whole platform is held to by default: 100,000 hosts heartbeat
# every 25 s, 25,000 every 10 s (the default interval). `--heartbeat-budget`.
DEFAULT_HEARTBEAT_BUDGET = 4000.0
# The longest interval the budget may stretch to, unless the operator configures more
# (`--heartbeat-max-interval`): a host that dies is noticed within a few of them.
DEFAULT_MAX_INTERVAL_S = 30.0


def heartbeat_interval(fleet: int, *, base_s: float, budget: float, max_s: float) -> float:
    """The interval that keeps `fleet` hosts within `budget` heartbeats per second: never under
    `base_s` (the configured interval), at most `max_s` (or `base_s` if that is longer), and
    whole seconds once stretched, so that a join or two does not change it (each change
    renders the heartbeat replies again)."""
    needed = fleet / budget if budget > 0 else 0.0
    if needed <= base_s:
        return base_s
    return max(base_s, min(max_s, float(math.ceil(needed))))
