"""Where a run's wall time went: seconds per named phase, for quantize's and verify's timing line.

    timer = PhaseTimer()
    with timer.phase("read"):
        w = read_tensor(ckpt, name)
        with timer.phase("quantize"):   # nested: its time is not the outer phase's
            q = quantize(w)
    timer.facts()  # {"seconds": total, "phases": {"read": s, "quantize": s, "other": s}, "dominant": "quantize"}

Phases are exclusive: while a nested phase runs, the outer one's clock stops, so the
phases and "other" (time in no phase) add up to the total. Two perf_counter calls per
phase: cheap enough to wrap every tensor read.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

OTHER = "other"


class PhaseTimer:
    """sync: called before each clock reading (torch.cuda.synchronize where work runs on a
    GPU: its kernels run after the call that launched them, and their time is that phase's)."""

    def __init__(self, sync: Callable[[], object] | None = None) -> None:
        self.sync = sync
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._stack: list[str] = []
        self._mark = self.started

    def _charge(self, now: float) -> None:
        """Time since the last switch to the phase running now (or to none)."""
        if self._stack:
            name = self._stack[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._mark
        self._mark = now

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._charge(self._now())
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge(self._now())
            self._stack.pop()

    def total(self) -> float:
        return time.perf_counter() - self.started

    def facts(self) -> dict:
        """Total seconds, seconds per phase (and "other": in none), and the one that took the most."""
        total = self.total()
        phases = dict(self.seconds)
        phases[OTHER] = max(0.0, total - sum(phases.values()))
        return {"seconds": total, "phases": phases, "dominant": max(phases, key=phases.get)}


def phases_text(phases: dict[str, float]) -> str:
    """'read 0.9 s, quantize 3.2 s, other 0.4 s': the phases by time taken, largest first."""
    ordered = sorted(phases.items(), key=lambda kv: (kv[0] == OTHER, -kv[1]))
    return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in ordered)
