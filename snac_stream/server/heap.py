"""The interpreter's cyclic garbage collector in a serving process: kept out of the ticks, and timed.

A server process allocates tens of thousands of small container objects a tick (per session: input pieces,
step markers, frames). With the collector's default thresholds a young collection comes every 700 net new
ones, and what outlives a tick (input queued while a server falls behind) is promoted and scanned again by
the older generations' passes, on whichever thread allocated last (the engine thread, most often): 9.6 ms
of a median tick and 100 ms at the 99th percentile for an H100 server behind on 2048 decode sessions
(bench/RESULTS.md, "Sessions per server"). :func:`freeze_heap` moves what lives as long as the server
(model, engines, modules) out of the collector's sight and raises the thresholds, so young collections come
once per many thousands of net allocations, most of a tick's objects being gone by then, and the older
passes rarely. :data:`GC_CLOCK` measures what the collector still takes.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Dict, List, Optional, Tuple

# Young collections per this many net allocations of container objects (the default is 700), a middle
# generation pass per SERVING_GC_THRESHOLDS[1] of them, the full pass per [2] middle ones (and only once
# the survivors since the last full pass are a quarter of those it kept: CPython's rule).
SERVING_GC_THRESHOLDS: Tuple[int, int, int] = (50_000, 20, 100)


class GCClock:
    """Time this process spends in cyclic garbage collection (every thread), from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seconds = 0.0  # in collections, since install
        self.collections: List[int] = [0, 0, 0]  # per generation
        self._started: Optional[float] = None

    def install(self) -> None:
        """Start timing (idempotent)."""
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1
            self._started = None

    def report(self) -> Dict[str, Any]:
        """JSON-able totals."""
        return {"seconds": round(self.seconds, 4), "collections": list(self.collections)}


GC_CLOCK = GCClock()

_saved_thresholds: List[Tuple[int, int, int]] = []


def freeze_heap() -> None:
    """Once a server has started (what is alive now lives as long as it): collect, freeze what survives (the
    full passes never scan it again), raise the thresholds to :data:`SERVING_GC_THRESHOLDS` and time the
    collections (:data:`GC_CLOCK`). :func:`thaw_heap` undoes it."""
    gc.collect()
    gc.freeze()
    _saved_thresholds.append(gc.get_threshold())
    gc.set_threshold(*SERVING_GC_THRESHOLDS)
    GC_CLOCK.install()


def thaw_heap() -> None:
    """Back to normal collection (and a clean interpreter exit) once the server is gone."""
    gc.unfreeze()
    if _saved_thresholds:
        gc.set_threshold(*_saved_thresholds.pop())
