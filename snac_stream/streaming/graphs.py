"""A pass captured once per key as a CUDA graph and replayed afterwards; what a captured pass of the model
depends on beyond its buffers (``model_stamp``); offline calls replayed per input shape (``ShapeGraphs``)."""

from __future__ import annotations

import collections
import contextlib
import operator
from typing import (Any, Callable, ContextManager, Dict, Generic, Hashable, List, Optional, OrderedDict, Sequence,
                    Tuple, TypeVar)

import torch
from torch import nn

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

    def drop(self, key: _Key) -> None:
        """Forget the graph of ``key`` (its memory goes back to the shared pool)."""
        self._graphs.pop(key, None)

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


_version = operator.attrgetter("_version")


def model_stamp(model: Any, parameters: Sequence[nn.Parameter], backend: Optional[str] = None) -> tuple:
    """What a captured pass of ``model`` depends on beyond its buffers: device, dtype, backend (``backend`` or
    the model's, resolved) and precision, the noise settings, and each parameter's storage and version counter
    (an in-place update, as ``load_state_dict`` makes, bumps it). Parameters made under ``inference_mode`` have
    no version counter; a pass then recomputes what it derives from them at every replay
    (``kernels.derived``). Replacing a parameter object rather than updating it is not seen by a caller that
    keeps its own list of ``parameters``."""
    try:
        versions = tuple(map(_version, parameters))  # map: this runs at every call, for ~200 parameters
    except RuntimeError:  # inference tensors
        versions = tuple(None if p.is_inference() else p._version for p in parameters)
    first = parameters[0]
    return (first.device, first.dtype, model.resolved_backend(backend), model.precision, model.noise_mode,
            model.noise_seed, tuple(map(torch.Tensor.data_ptr, parameters)), versions)


class ShapeGraphs:
    """Offline calls ``fn(*inputs)`` replayed as one CUDA graph per name and input shape.

    A call of a new shape runs eagerly; its ``after``-th call (default the second) captures the graph, and later
    calls copy their inputs into the graph's buffers and replay it: one launch instead of one per kernel, for a
    pass that is launch-bound at batch 1. At most ``keep`` graphs stay (the least recently used go), and all of
    them are dropped when ``stamp`` changes (the model moved, its weights or settings changed). Outputs are
    copies, made in the caller's grad mode. ``fn`` must not synchronise with the host. With ``captured=False``
    the same buffers and decisions run uncaptured (any device: what the tests exercise without a GPU).
    """

    def __init__(self, device: torch.device, keep: int, after: int = 2, captured: bool = True):
        self.device = device
        self.keep = keep
        self.after = after
        self.captured_graphs = captured
        self._stamp: Optional[tuple] = None
        self._reset()

    def _reset(self) -> None:
        # warmup=1: the eager calls before the capture compiled the kernels already.
        self._graphs: CUDAGraphed[Hashable, Any] = CUDAGraphed(self._pass, self.device, warmup=1,
                                                               enabled=self.captured_graphs)
        self._seen: OrderedDict[Hashable, int] = collections.OrderedDict()  # eager calls per key not kept yet
        # The kept passes, least recently used first: each key's fn and input buffers.
        self._passes: OrderedDict[Hashable, Tuple[Callable[..., Any], List[torch.Tensor]]] = collections.OrderedDict()

    def kept(self) -> List[Hashable]:
        """The keys whose passes (graphs, when captured) are kept, least recently used first."""
        return list(self._passes)

    def __call__(self, name: str, fn: Callable[..., Any], inputs: Sequence[torch.Tensor], stamp: tuple) -> Any:
        """``fn(*inputs)``, eagerly or replayed; ``name`` tells passes of different ``fn`` apart."""
        if stamp != self._stamp:
            self._reset()  # free the old graphs before capturing new ones
            self._stamp = stamp
        key = (name, *((tuple(t.shape), t.dtype) for t in inputs))
        if key not in self._passes:
            calls = self._seen.pop(key, 0) + 1
            if calls < self.after:
                self._seen[key] = calls
                while len(self._seen) > 8 * max(self.keep, 1):  # shapes seen once, forgotten in time
                    self._seen.popitem(last=False)
                return fn(*inputs)
            with torch.inference_mode():
                self._passes[key] = (fn, [torch.empty_like(t) for t in inputs])
        self._passes.move_to_end(key)
        with torch.inference_mode():
            for buffer, t in zip(self._passes[key][1], inputs):
                buffer.copy_(t)
            outputs = self._graphs(key)
        while len(self._passes) > self.keep:
            dropped, _ = self._passes.popitem(last=False)
            self._graphs.drop(dropped)
        return [t.clone() for t in outputs] if isinstance(outputs, list) else outputs.clone()

    def _pass(self, key: Hashable) -> Any:
        fn, buffers = self._passes[key]
        return fn(*buffers)
