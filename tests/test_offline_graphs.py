"""Offline ``encode`` / ``decode`` replayed as CUDA graphs per input shape (``SNAC(offline_graphs=...)``,
``streaming.graphs.ShapeGraphs``).

Without a GPU the same passes run uncaptured (``ShapeGraphs(captured=False)``): the staging into buffers, the
counting of calls per shape, the least-recently-used limit and the stamp are those of the GPU path. The ``gpu``
tests check that replays give the eager outputs bit for bit.
"""

from __future__ import annotations

from typing import Any, List

import pytest
import torch

from snac_stream import PRESETS, SNAC
from snac_stream.streaming import snac as snac_module
from snac_stream.streaming.graphs import ShapeGraphs, model_stamp

CUDA = torch.cuda.is_available()
SMALL_24KHZ = {**PRESETS["24khz"].to_dict(), "encoder_dim": 8, "decoder_dim": 64}


def small_model(device: str = "cpu", **kwargs: Any) -> SNAC:
    torch.manual_seed(0)
    return SNAC(**SMALL_24KHZ, **kwargs).to(device).eval()


def random_codes(model: SNAC, frames: int, batch: int = 1, device: str = "cpu") -> List[torch.Tensor]:
    cfg = model.config
    return [torch.randint(0, cfg.codebook_size, (batch, frames * cfg.coarse_stride // s), device=device)
            for s in cfg.vq_strides]


class Recorder:
    """``fn`` wrapped to record whether each call got the caller's tensors or the pass's buffers."""

    def __init__(self, fn: Any):
        self.fn = fn
        self.inputs: List[List[torch.Tensor]] = []

    def __call__(self, *inputs: torch.Tensor) -> Any:
        self.inputs.append(list(inputs))
        return self.fn(*inputs)


def test_passes_of_repeated_shapes_run_from_buffers_and_equal_eager_calls() -> None:
    model = small_model()
    graphs = ShapeGraphs(torch.device("cpu"), keep=2, captured=False)
    stamp = model_stamp(model, list(model.parameters()))
    decode = Recorder(model._decode_checked)
    with torch.inference_mode():
        codes = [random_codes(model, 3), random_codes(model, 3)]
        want = [model.decode(c) for c in codes]
        first = graphs("decode", decode, codes[0], stamp)
        assert decode.inputs[-1][0] is codes[0][0]  # the first call of a shape runs on the caller's tensors
        second = graphs("decode", decode, codes[1], stamp)
        assert decode.inputs[-1][0] is not codes[1][0]  # the second from the pass's buffers
        assert graphs.kept() == [("decode", *((tuple(c.shape), torch.int64) for c in codes[1]))]
        assert torch.equal(first, want[0]) and torch.equal(second, want[1])
        second.zero_()  # outputs are copies: the next call does not see this
        again = graphs("decode", decode, codes[1], stamp)
        assert torch.equal(again, want[1])
        audio = torch.randn(1, 1, 2 * model.config.pad_multiple) * 0.1
        encode = Recorder(model._encode_padded)
        for _ in range(3):
            got = graphs("encode", encode, [audio], stamp)
            assert all(torch.equal(a, b) for a, b in zip(got, model.encode(audio)))
        assert len(graphs.kept()) == 2


def test_the_least_recently_used_shape_goes_and_a_new_stamp_forgets_every_pass() -> None:
    model = small_model()
    graphs = ShapeGraphs(torch.device("cpu"), keep=2, captured=False)
    stamp = model_stamp(model, list(model.parameters()))
    with torch.inference_mode():
        by_frames = {n: random_codes(model, n) for n in (1, 2, 3)}
        for n in (1, 2, 1, 2, 3, 3):
            graphs("decode", model._decode_checked, by_frames[n], stamp)
        kept_frames = [key[1][0][1] for key in graphs.kept()]
        assert kept_frames == [2, 3]  # 1 was the least recently used when 3 came in
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)  # an in-place update bumps the version counters: the stamp changes
        new_stamp = model_stamp(model, list(model.parameters()))
        assert new_stamp != stamp
        got = graphs("decode", model._decode_checked, by_frames[3], new_stamp)
        assert graphs.kept() == []  # forgotten; this call was the shape's first again
        assert torch.equal(got, model.decode(by_frames[3]))


def test_offline_graphs_setting_is_checked_and_cpu_calls_stay_eager() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="offline_graphs"):
            SNAC(**SMALL_24KHZ, offline_graphs=bad)
    model = small_model()
    assert model.offline_graphs == 4
    with pytest.raises(ValueError, match="offline_graphs"):
        model.offline_graphs = -1
    assert model.offline_graphs == 4
    with torch.inference_mode():
        codes = random_codes(model, 2)
        model.decode(codes)
        model.decode(codes)
    assert snac_module._OFFLINE[model].graphs is None
    # The parameters the graphs are stamped with are the model's, also after a load that replaces them.
    def same(a: List[torch.Tensor], b: List[torch.Tensor]) -> bool:
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))

    before = list(model.parameters())
    assert same(snac_module._OFFLINE[model].parameters(), before)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert not same(list(model.parameters()), before)
    assert same(snac_module._OFFLINE[model].parameters(), list(model.parameters()))
    assert SNAC.from_config("24khz", offline_graphs=0).offline_graphs == 0


def test_which_calls_replay_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule a CUDA model applies to each offline call (asked here with a CUDA device, no GPU needed): calls
    of at most ``OFFLINE_GRAPH_MAX_SAMPLES`` audio samples (batch x samples, decode's counted from its codes)
    replay graphs; longer ones, calls autograd records and CPU models run eagerly."""
    model = small_model()
    fs = model.config.frame_samples
    monkeypatch.setattr(snac_module, "OFFLINE_GRAPH_MAX_SAMPLES", 8 * fs)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # a CPU build cannot answer
    parameters, cuda = list(model.parameters()), torch.device("cuda")
    with torch.inference_mode():
        for batch, frames, replays in ((1, 8, True), (2, 4, True), (1, 9, False), (2, 5, False)):
            codes = model.check_codes(random_codes(model, frames, batch))
            assert model.decode(codes).numel() == batch * frames * fs  # the samples the rule counts
            assert model._replays("decode", codes, parameters, cuda) == replays, (batch, frames)
            audio = model.preprocess(torch.zeros(batch, 1, frames * fs))
            assert model._replays("encode", [audio], parameters, cuda) == replays, (batch, frames)
        short = model.check_codes(random_codes(model, 2))
        assert not model._replays("decode", short, parameters, torch.device("cpu"))
    assert not model._replays("decode", short, parameters, cuda)  # grad enabled, parameters requiring it
    model.offline_graphs = 0
    with torch.inference_mode():
        assert not model._replays("decode", short, parameters, cuda)


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (the tests above run the same passes uncaptured)")


@gpu
@needs_cuda
@pytest.mark.parametrize("preset", ["24khz", "44khz"])
def test_gpu_replays_equal_eager_calls_bit_for_bit(preset: str) -> None:
    torch.manual_seed(0)
    model = SNAC.from_config(preset).cuda().eval()
    eager = SNAC.from_config(preset, offline_graphs=0).cuda().eval()
    eager.load_state_dict(model.state_dict())
    cfg = model.config
    with torch.inference_mode():
        for frames in (8, 16, 8):
            codes = random_codes(model, frames, device="cuda")
            audio = torch.randn(1, 1, frames * cfg.frame_samples, device="cuda") * 0.1
            for _ in range(3):  # eager, captured, replayed
                assert torch.equal(model.decode(codes), eager.decode(codes))
                assert all(torch.equal(a, b) for a, b in zip(model.encode(audio), eager.encode(audio)))
        graphs = snac_module._OFFLINE[model].graphs
        assert len(graphs.kept()) == 4  # decode and encode, two shapes each
        # Weights updated in place: the graphs are dropped and the outputs follow the new weights.
        state = {k: v * 1.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        eager.load_state_dict(state)
        for _ in range(3):
            assert torch.equal(model.decode(codes), eager.decode(codes))
    # Calls autograd would record run eagerly: a new shape called again and again captures nothing.
    kept = graphs.kept()
    codes = random_codes(model, 4, device="cuda")
    for _ in range(3):
        got = model.decode(codes)
    assert graphs.kept() == kept
    with torch.inference_mode():
        assert torch.equal(got, eager.decode(codes))


@gpu
@needs_cuda
def test_gpu_graphs_keep_at_most_the_set_number_of_shapes() -> None:
    model = SNAC.from_config("24khz", offline_graphs=2).cuda().eval()
    with torch.inference_mode():
        for frames in (4, 8, 12, 4, 4):
            codes = random_codes(model, frames, device="cuda")
            model.decode(codes)
            model.decode(codes)
    kept = snac_module._OFFLINE[model].graphs.kept()
    assert [key[1][0][1] for key in kept] == [12, 4]
