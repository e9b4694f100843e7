"""A pass captured once per key as a CUDA graph and replayed afterwards."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, Generic, Hashable, List, Optional, Tuple, TypeVar

import torch

_Key = TypeVar("_Key", bound=Hashable)
_Out = TypeVar("_Out")


class CUDAGraphed(Generic[_Key, _Out]):
    """``fn(key)`` as one CUDA graph per ``key``: captured at its first call (or by :meth:`capture`), replayed
    at every later one, one launch instead of one per kernel.

    ``fn`` must read and write only tensors that stay at fixed addresses (the caller stages its inputs into
    buffers before a call) and return tensors; a replay rewrites those same output tensors, so a caller copies
    what it keeps past the next call. Before its capture, ``fn(key)`` runs ``warmup`` times for real on a side
    stream, which compiles its kernels and settles the allocator; ``frozen()``, when given, is entered around
    those runs and the capture, for the caller to make them leave its state as it was. All graphs share one
    memory pool.

    With ``enabled=False`` (no CUDA device) a call runs ``fn(key)`` eagerly: the same pass, uncaptured.
    """

    def __init__(self, fn: Callable[[_Key], _Out], device: torch.device, *, enabled: bool = True,
                 warmup: int = 2, frozen: Optional[Callable[[], ContextManager[None]]] = None):
        self.fn = fn
        self.device = device
        self.enabled = enabled
        self.warmup = warmup
        self.frozen = frozen or contextlib.nullcontext
        self._graphs: Dict[_Key, Tuple[torch.cuda.CUDAGraph, _Out]] = {}
        self._pool = torch.cuda.graph_pool_handle() if enabled else None

    def __contains__(self, key: _Key) -> bool:
        return key in self._graphs

    def captured(self) -> List[_Key]:
        """The keys captured so far."""
        return list(self._graphs)

    def graph(self, key: _Key) -> torch.cuda.CUDAGraph:
        """The graph captured for ``key`` (to replay or time it alone)."""
        return self._graphs[key][0]

    def capture(self, key: _Key) -> None:
        """Capture ``fn(key)`` now, unless it is captured already (or capturing is off)."""
        if not self.enabled or key in self._graphs:
            return
        current = torch.cuda.current_stream(self.device)
        with self.frozen():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(key)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = self.fn(key)
        self._graphs[key] = (graph, outputs)

    def __call__(self, key: _Key) -> _Out:
        """Run ``fn(key)``: replay its graph (captured first if new), or call it eagerly when disabled."""
        if not self.enabled:
            return self.fn(key)
        self.capture(key)
        graph, outputs = self._graphs[key]
        graph.replay()
        return outputs
