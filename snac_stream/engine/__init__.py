"""Many concurrent streams on one model: one batched step for all of them.

Modules: ``base`` (the slot pool and batched stepping), ``decode`` and ``encode`` (the two engines). The CUDA
graphs are ``streaming.graphs`` (a pass captured once per key and replayed), shared with the streaming objects.

``DecodeEngine`` (codes in, audio out) and ``EncodeEngine`` (audio in, codes out) own one model and a pool
of ``max_streams`` stream slots. Streams open and close at any time; each ``step()`` runs one *step* (one
attention window: 1 coarse frame at 24 kHz, 4 at 32/44 kHz) for every stream that has one queued, in a
single batched pass, so N streams cost one kernel sequence.

A stream's first steps (its warm-up, derived from the architecture: the steps before its layer states reach
their steady shapes) change its state's shapes, so each warm-up phase (steps run so far) has a batch of its
own, one row per slot, as the steady phase does: a step runs one batched pass per phase with a stream due,
which moves those rows on to the next phase's batch (the steady batch's stay in it). Streams that started at
different times share a pass as soon as they have run as many steps. Rows never mix: every layer acts on each
batch row alone, the noise is keyed per row, and a closed slot's steady row is zeroed before reuse. Every
stream's output equals its own ``StreamingDecoder`` / ``StreamingEncoder`` (and so offline ``decode`` /
``encode``).

How the batched step runs (``step_mode``):

- ``rows``: gather the rows of the streams with a step queued, advance them, write them back. Least work;
  the default on CPU.
- ``buckets``: gather the rows of the streams with a step queued into a batch of ``k`` rows, ``k`` the
  smallest bucket size at least their number (``base.bucket_sizes``: powers of two up to 32, then four sizes
  per octave, and ``max_streams``), advance it and write it back; the
  bucket's unused places read and write a spare row. The list of rows is a buffer and every tensor stays
  where it is, so the pass has fixed shapes and addresses, and a step costs what its streams need: streams
  whose steps fall due at different times (a server's clients) each take part only in the steps that run
  theirs.
- ``graphs``: ``buckets`` with each bucket's pass captured once as a CUDA graph and replayed (one launch
  instead of hundreds; ``streaming.graphs.CUDAGraphed``). The default on CUDA. Warm-up phases' passes take
  powers of two only (``warmup_buckets``: few streams start at once, and only for a few steps), fewer graphs.
  ``capture_graphs()`` captures every (phase, bucket) pass up front; otherwise a pass is captured the first time
  it is needed.

Input submitted on the CPU stays there until its step, which moves every stream's input to the model's device
in one copy; ``output_device="cpu"`` likewise returns a step's outputs with one copy for all streams. A server
feeding a GPU engine from the network would otherwise pay a host-device copy, and a synchronisation, per
stream and step. With ``async_output=True`` as well, ``step_groups()`` returns once the step and that copy
are queued on the GPU (``StepGroups.wait()`` before reading the outputs): the server does its host work for
other steps while the GPU computes this one.
"""


from .base import STEP_MODES, EngineFull, StepGroups, StreamEngine
from .decode import DecodeEngine
from .encode import EncodeEngine

__all__ = ["DecodeEngine", "EncodeEngine", "EngineFull", "StepGroups", "StreamEngine", "STEP_MODES"]
