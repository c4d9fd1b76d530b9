"""The faults the sandbox injects, on cue and in the background."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:

    from coupon_devtools.sandbox import SandboxAdmin
from coupon_devtools.chaos.defaults import SLOW_ORIGINAL_S


class FaultBook:
    """The sandbox's fault rules, counted by label across every replacement.

    The sandbox applies the first matching rule, so an outage rule must come first: putting
    one in (or taking it out) clears the rules and registers them again, with the uses left.
    """

    FIELDS: Final = ("kind", "times", "series", "customer", "path", "delaySeconds", "status",
                     "retryAfterSeconds", "probability")

    def __init__(self, admin: SandboxAdmin) -> None:
        self.admin = admin
        self.labels: dict[int, str] = {}
        self.struck: Counter[str] = Counter()
        self._lead: int | None = None
        self._lock = threading.Lock()

    def add(self, label: str, **rule: Any) -> None:
        with self._lock:
            self.labels[self.admin.add_fault(**rule)] = label

    def lead_with(self, label: str | None, **rule: Any) -> None:
        """Make ``rule`` the first rule (or, with no label, remove the leading one)."""
        with self._lock:
            current = self.admin.faults()
            self.admin.clear_faults()
            for old in current:
                self.struck[self.labels.get(old["id"], old["kind"])] += int(old["applied"])
            kept = [(self.labels.get(old["id"], old["kind"]), old) for old in current
                    if old["times"] != 0 and old["id"] != self._lead]
            self.labels, self._lead = {}, None
            if label is not None:
                self._lead = self.admin.add_fault(**rule)
                self.labels[self._lead] = label
            for old_label, old in kept:
                self.labels[self.admin.add_fault(**{k: old[k] for k in self.FIELDS})] = old_label

    def totals(self) -> Counter[str]:
        with self._lock:
            totals = Counter(self.struck)
            for rule in self.admin.faults():
                totals[self.labels.get(rule["id"], rule["kind"])] += int(rule["applied"])
            return totals


BACKGROUND_FAULTS: Final[Sequence[tuple[str, dict[str, Any]]]] = (
    ("5xx with a JSON body after issuing",
     {"kind": "error_json_after", "status": 500, "probability": 0.01}),
    (f"slow original ({SLOW_ORIGINAL_S:g} s, lands after the client gave up)",
     {"kind": "slow_original", "delaySeconds": SLOW_ORIGINAL_S, "probability": 0.005}),
    ("reset after issuing", {"kind": "reset_after", "probability": 0.01}),
    ("redirect (307) after issuing", {"kind": "redirect_after", "probability": 0.005}),
    ("garbled stream after issuing", {"kind": "garbled_after", "probability": 0.005}),
    ("unreadable read-back (HTML)",
     {"kind": "readback_unreadable", "path": "readback", "probability": 0.05}),
)
