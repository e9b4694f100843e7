"""Stream engines: step latency against concurrent streams, and how many real-time streams fit.

    python bench/engine_capacity.py [--kind decode|encode] [--preset 24khz] [--streams 1 8 64 ...]
                                    [--device cuda] [--step-mode auto|rows|buckets|graphs] [--phases P]
                                    [--reference] [--json out.json] [--plot out.png]

For each stream count N the engine holds N streams past their warm-up and runs ``--steps`` batched steps;
each step decodes (or encodes) one step (2048 samples at 24 kHz) for every stream. A stream is real time when a step
finishes inside the audio it produces; capacity is the largest N whose p95 step latency meets that. As a
server does, the timed steps run with everything alive before them frozen out of Python's cyclic garbage
collector (``gc.freeze``; ``--no-gc-freeze`` to compare): a full collection otherwise scans the engine's
objects, 80-120 ms on a CPU core with 2048 slots, inside whichever step it lands in.
On CUDA each step's GPU time is also taken from CUDA events (``gpu_*`` columns) and the peak memory is
reported; with ``--step-mode graphs`` (the CUDA default) the bucket's graph is captured before timing.
``--phases P`` staggers the streams as a server's clients are: past their warm-up, stream ``i`` has a step
queued every ``P`` engine steps (in phase ``i % P``), so each step runs about ``N / P`` of them and a stream is
real time when ``P`` steps fit in the audio one produces. ``--reference`` also times the reference ``snac``
package in the same run: an Orpheus-style window (decode 4 coarse frames, keep 1) at batch 1, the same window
batched over each N (one CUDA graph on CUDA: the reference's best step for N streams, drawn beside ours in
``--plot``), and offline decode of 64 x 10 s. ``--profile`` prints the top kernels of 5 steps and the kernel
time's shares: the project's Triton kernels, cuBLAS, and PyTorch's own kernels (the data
movement around them). The ``host`` column is the host's part of a step: gathering the due streams' input and
launching the work (on CUDA the GPU waits for it). ``--feed host`` hands the input over as the server does (numpy
arrays, one call per step: coarse frames for codes) instead of one tensor on the device per stream. Random weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_cost import commit, describe_machine, median_time, sync  # noqa: E402

from snac_stream import SNAC  # noqa: E402
from snac_stream.engine import DecodeEngine, EncodeEngine  # noqa: E402
from snac_stream.kernels.precision import DEFAULT_PRECISION, PRECISIONS  # noqa: E402
from snac_stream.model import functional  # noqa: E402
from snac_stream.model.vq import codes_to_frames  # noqa: E402


def measure(model: SNAC, kind: str, streams: int, steps: int, backend: str | None, step_mode: str,
            profile: bool = False, gc_freeze: bool = True, phases: int = 1, feed: str = "device") -> dict:
    device = model.device
    cuda = device.type == "cuda"
    gc.collect()  # the previous stream count's engine (its graphs' memory pool) lives in reference cycles
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    engine = (DecodeEngine if kind == "decode" else EncodeEngine)(model, streams, backend=backend,
                                                                  step_mode=step_mode)
    cfg = model.config
    extra = 5 if profile else 0
    if phases == 1:
        total_steps = engine.warmup_steps + steps + 2 + extra  # queued input for every step run
    else:  # the warm-up and one step together, one untimed round of the phases, then a step every P
        total_steps = engine.warmup_steps + 1 + 1 + (steps + extra) // phases + 2
    frames = total_steps * engine.step_frames
    gen = torch.Generator(device="cpu").manual_seed(streams)
    sids = [engine.open() for _ in range(streams)]
    data = {}
    for sid in sids:
        if kind == "decode":
            data[sid] = [torch.randint(0, cfg.codebook_size, (1, frames * cfg.coarse_stride // s), generator=gen)
                         for s in cfg.vq_strides]
        else:
            data[sid] = torch.randn(1, 1, frames * cfg.frame_samples, generator=gen) * 0.1
        if feed == "host":  # as a server holds its sessions' input: numpy, coarse frames for codes
            data[sid] = (codes_to_frames(data[sid], cfg.codes_per_frame)[0].numpy() if kind == "decode"
                         else data[sid].view(-1).numpy())
        else:
            data[sid] = [c.to(device) for c in data[sid]] if kind == "decode" else data[sid].to(device)
    fed = dict.fromkeys(sids, 0)

    def feed_steps(group, count: int = 1) -> None:
        """Queue ``count`` more steps of input for the streams of ``group`` (fed together: the same count)."""
        first = fed[group[0]]
        for sid in group:
            fed[sid] = first + count
        if feed == "host":  # one call for the group, as a server's tick hands its sessions' input over
            if kind == "decode":
                cut = slice(first * engine.step_frames, (first + count) * engine.step_frames)
                engine.submit_frames(group, np.stack([data[sid][cut] for sid in group]))
            else:
                cut = slice(first * engine.step_samples, (first + count) * engine.step_samples)
                engine.submit_arrays(group, [data[sid][cut] for sid in group])
            return
        for sid in group:
            if kind == "decode":
                engine.submit(sid, [c[:, first * c.shape[1] // total_steps:(first + count) * c.shape[1] // total_steps]
                                    for c in data[sid]])
            else:
                engine.submit(sid, data[sid][..., first * engine.step_samples:(first + count) * engine.step_samples])

    phase_of = [sids[i::phases] for i in range(phases)]  # interleaved, as clients that connect one by one
    # Staggered streams, and input fed from the host as a server's ticks hand it over, get theirs step by step.
    per_step = phases > 1 or feed == "host"
    feed_steps(sids, engine.warmup_steps + 1 if per_step else total_steps)
    for _ in range(engine.warmup_steps):  # the streams' warm-up, outside the batch
        engine.step()
    sync(device)
    start = time.perf_counter()
    engine.step()  # first batched step: compiles kernels, captures the bucket's graph
    sync(device)
    first_ms = 1e3 * (time.perf_counter() - start)
    if phases > 1:
        for group in phase_of:  # one untimed round: the phases' bucket compiled and captured
            feed_steps(group)
            engine.step()
        sync(device)

    def step(i: int) -> None:
        if per_step:
            feed_steps(phase_of[i % phases])
        engine.step()

    # The host's part of each step: gathering the due streams' input and launching the work (``step_groups``,
    # until it returns; splitting the outputs per stream comes after and overlaps the GPU's work).
    host: list = []
    launch = engine.step_groups

    def timed_launch():
        groups = launch()
        host.append(groups.wall_s)
        return groups

    engine.step_groups = timed_launch
    if gc_freeze:
        gc.collect()
        gc.freeze()
    times, gpu = [], []
    for i in range(steps):
        sync(device)
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        if per_step:
            feed_steps(phase_of[i % phases])
        start = time.perf_counter()
        engine.step()
        if cuda:
            end.record()
        sync(device)
        times.append(time.perf_counter() - start)
        if cuda:
            gpu.append(begin.elapsed_time(end) / 1e3)
    audio = engine.step_samples / cfg.sampling_rate  # what a stream's step produces
    budget = audio / phases  # each stream steps once every ``phases`` engine steps
    row = {"streams": streams, "phases": phases, **percentiles(times, ""), "budget_ms": 1e3 * budget,
           "realtime": percentiles(times, "")["p95_ms"] <= 1e3 * budget,
           "aggregate_rtf": streams * budget / statistics.median(times), "first_batched_step_ms": first_ms,
           "state_bytes_per_stream": engine.state_bytes_per_stream, "step_mode": engine.step_mode,
           "steps_ms": [round(1e3 * t, 3) for t in times]}  # in order: slow steps' pattern, not just percentiles
    row.update(percentiles(host, "host_"))
    if cuda:
        row.update(percentiles(gpu, "gpu_"))
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_memory_mib_per_stream"] = row["peak_memory_gib"] * 1024 / streams
    if engine.step_mode == "graphs":  # the captured pass alone: GPU time of one step's kernels
        passes = engine._bucket_passes
        graph = passes.graph(max(passes.captured()))
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(20):
            graph.replay()
        end.record()
        sync(device)
        row["replay_gpu_ms"] = begin.elapsed_time(end) / 20
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            for i in range(steps, steps + 5):
                step(i)
            sync(device)
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        print(f"profile, {streams} streams, {engine.step_mode}: {len(kernels) / 5:.0f} kernels per step, "
              f"{sum(e.device_time for e in kernels) / 5 / 1e3:.3f} ms kernel time per step")
        if kernels:
            row["kernel_shares_pct"] = shares = kernel_shares(kernels)
            print("shares of the kernel time: " + ", ".join(f"{KERNEL_GROUPS[k]} {v:.1f} %" for k, v in shares.items()))
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=24, max_name_column_width=90))
    gc.unfreeze()  # the next stream count starts from a collectable heap
    return row


KERNEL_GROUPS = {"triton": "the project's Triton kernels", "cublas": "cuBLAS products",
                 "pytorch": "PyTorch's own (state copies, row gathers and writes, concatenations, small elementwise ops)"}


def kernel_shares(kernels: list) -> dict:
    """Per cent of the profiled kernels' GPU time by who wrote them (``KERNEL_GROUPS``): the project's Triton
    kernels are named with a leading underscore, cuBLAS's products carry "gemm", the rest is PyTorch's own,
    which in an engine step is the data movement around the kernels (issue 17's copy share)."""
    total = sum(e.device_time for e in kernels)
    times = dict.fromkeys(KERNEL_GROUPS, 0.0)
    for e in kernels:
        group = "triton" if e.name.startswith("_") else "cublas" if "gemm" in e.name.lower() else "pytorch"
        times[group] += e.device_time
    return {group: 100.0 * t / total for group, t in times.items()} if total else {}


def percentiles(times: list, prefix: str) -> dict:
    """p50/p95/p99 in ms of a list of seconds."""
    ordered = sorted(times)
    q = lambda p: ordered[min(len(ordered) - 1, int(p * len(ordered)))]  # noqa: E731
    return {f"{prefix}p{p}_ms": 1e3 * q(p / 100) for p in (50, 95, 99)}


def accuracy(model: SNAC, kind: str) -> dict:
    """How far the model's precision moves offline results from the default ``tf32x3``: audio max error and
    SNR (decode), or the fraction of codes that differ (encode). Random inputs, 4 x 2 s."""
    cfg, device = model.config, model.device
    gen = torch.Generator(device="cpu").manual_seed(1)
    precision = model.precision
    frames = int(2 * cfg.sampling_rate) // cfg.pad_multiple * cfg.pad_multiple // cfg.frame_samples
    with torch.inference_mode():
        if kind == "decode":
            codes = [torch.randint(0, cfg.codebook_size, (4, frames * cfg.coarse_stride // s), generator=gen).to(device)
                     for s in cfg.vq_strides]
            got = model.decode(codes)
            model.precision = "tf32x3"
            want = model.decode(codes)
            model.precision = precision
            snr = 10 * torch.log10(want.pow(2).mean() / (got - want).pow(2).mean().clamp_min(1e-30))
            return {"max_abs_error": (got - want).abs().max().item(), "snr_db": snr.item()}
        audio = (torch.randn(4, 1, frames * cfg.frame_samples, generator=gen) * 0.1).to(device)
        got = model.encode(audio)
        model.precision = "tf32x3"
        want = model.encode(audio)
        model.precision = precision
        differ = sum(int((a != b).sum()) for a, b in zip(got, want))
        return {"codes_differing": differ, "codes": sum(c.numel() for c in want)}


def reference_rows(model: SNAC, streams: list) -> dict:
    import snac as reference

    device = model.device
    ref = reference.SNAC(**model.config.to_dict()).to(device).eval()
    cfg = model.config
    out = {}
    with torch.inference_mode():
        window = [torch.randint(0, cfg.codebook_size, (1, 4 * cfg.coarse_stride // s), device=device)
                  for s in cfg.vq_strides]
        long = [torch.randint(0, cfg.codebook_size, (64, int(10 * cfg.sampling_rate) // cfg.hop_length // s),
                              device=device) for s in cfg.vq_strides]
        for name, fn, reps in (("orpheus_window_ms", lambda: ref.decode(window)[..., -cfg.frame_samples:], 50),
                               ("offline_64x10s_ms", lambda: ref.decode(long), 5)):
            out[name] = 1e3 * median_time(fn, reps, device)
    audio = 64 * long[-1].shape[-1] * cfg.hop_length / cfg.sampling_rate
    out["offline_64x10s_realtime_x"] = audio / (out["offline_64x10s_ms"] / 1e3)
    out["window_steps_ms"] = reference_window_steps(ref, cfg, streams, device)
    return out


def reference_window_steps(ref, cfg, streams: list, device: torch.device) -> dict:
    """The reference's best step for N streams: one Orpheus-style window per stream (decode the last 4 coarse
    frames, keep the newest), all N in one batch, replayed as one CUDA graph (eager off CUDA). Median ms per
    step for each N, ascending; None from the first N that runs out of memory on."""
    from snac_stream.streaming.graphs import CUDAGraphed

    steps: dict = {}
    windows: dict = {}

    def window(n: int) -> torch.Tensor:
        return ref.decode(windows[n])[..., -cfg.frame_samples:]

    graphed = CUDAGraphed(window, device, enabled=device.type == "cuda")
    for n in sorted(set(streams)):
        if steps and steps[max(steps)] is None:
            steps[n] = None
            continue
        windows[n] = [torch.randint(0, cfg.codebook_size, (n, 4 * cfg.coarse_stride // s), device=device)
                      for s in cfg.vq_strides]
        try:
            with torch.inference_mode():
                steps[n] = 1e3 * median_time(lambda: graphed(n), 10, device)
        except RuntimeError as exc:  # an allocation failing inside a capture surfaces as the capture's error
            if "out of memory" not in str(exc):
                raise
            steps[n] = None
        graphed.drop(n)  # its memory back to the pool for the next N
        del windows[n]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=["decode", "encode"], default="decode")
    parser.add_argument("--preset", default="24khz")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="auto (default), triton or torch")
    parser.add_argument("--step-mode", default="auto", choices=["auto", "rows", "buckets", "graphs"],
                        help="how the batched step runs (auto: graphs on CUDA, rows on CPU)")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the top 24 kernels of 5 steps per stream count")
    parser.add_argument("--phases", type=int, default=1,
                        help="stagger the streams: each has a step queued every P engine steps (default 1: every step)")
    parser.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
                        help="products of the Triton dense convs (default tf32x3, about fp32)")
    parser.add_argument("--plain-tiles", action="store_true",
                        help="dense-conv tiles from the plain rule, without the small-launch fill (comparison)")
    parser.add_argument("--upsampling", default="model", choices=["model", *PRECISIONS],
                        help="precision of the decoder's upsampling products (cuBLAS): the model's (default) or "
                             "another, e.g. ieee for the fp32 GEMM without tensor cores (comparison)")
    parser.add_argument("--upsampling-product", default="auto", choices=["auto", *functional.UPSAMPLING_PRODUCTS],
                        help="how the Triton backend multiplies the upsampling's frame pairs: auto (the model's, "
                             "per layer), cublas (fp32 GEMM), conv or conv_split (the dense-conv kernel on tensor "
                             "cores; see bench/upsampling_cost.py)")
    parser.add_argument("--rows-first", default="rule", choices=["rule", "on", "off"],
                        help="the dense convs split in registers (1x1 at tf32x3): the rows-first product, the "
                             "per-step one, or the kernels' rule")
    parser.add_argument("--split-operands", default="rule", choices=["rule", "on", "off"],
                        help="tf32x3 dense convs: operands split before the kernel (on), in registers with the "
                             "rows-first product (off), or the rule (before, for convs with taps)")
    parser.add_argument("--feed", default="device", choices=["device", "host"],
                        help="where the streams' input waits: device (default): tensors on the model's device, "
                             "submitted per stream; host: numpy arrays submitted in one call per step, as the "
                             "server does (coarse frames for codes)")
    parser.add_argument("--tuning-json", type=Path,
                        help="add the dense-conv entries of a `bench/tune.py --json` sweep (those more than 5%% "
                             "faster than the default rule) to the tuning table before the run")
    parser.add_argument("--no-gc-freeze", action="store_true",
                        help="leave the objects alive before the timed steps to the cyclic garbage collector")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    if args.phases < 1 or args.steps < 1 or min(args.streams) < 1:
        parser.error("--phases, --steps and --streams must be at least 1")
    device = torch.device(args.device)
    if args.tuning_json:
        from snac_stream.kernels import tuning
        from tune import winning_entries

        try:
            entries = winning_entries(json.loads(args.tuning_json.read_text())["shapes"])
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            parser.error(f"--tuning-json {args.tuning_json}: not a bench/tune.py --json file ({exc!r})")
        for key, cfg in entries:
            tuning.TABLE[key] = cfg
            print(f"tuning entry {key}: {cfg}")
    if args.plain_tiles:
        from snac_stream.kernels import tuning

        tuning._programs_wanted = lambda device: 0
    if args.upsampling != "model" or args.upsampling_product != "auto":
        model_conv_transpose = functional.conv_transpose

        def conv_transpose(*a, **k):  # set on every call: the context variables do not reach other threads
            token = functional._PRECISION.set(args.upsampling) if args.upsampling != "model" else None
            try:
                with functional.use_upsampling_product(args.upsampling_product):
                    return model_conv_transpose(*a, **k)
            finally:
                if token is not None:
                    functional._PRECISION.reset(token)

        functional.conv_transpose = conv_transpose
    torch.manual_seed(0)
    model = SNAC.from_config(args.preset).to(device).eval()
    model.precision = args.precision
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": commit(),
            "device": describe_machine(device), "torch": torch.__version__, "preset": args.preset,
            "backend": model.resolved_backend(args.backend), "kind": args.kind, "step_mode": args.step_mode,
            "tiles": "plain" if args.plain_tiles else "fill", "precision": args.precision,
            "upsampling_precision": args.precision if args.upsampling == "model" else args.upsampling,
            "upsampling_product": args.upsampling_product,
            "gc_freeze": not args.no_gc_freeze, "phases": args.phases, "rows_first": args.rows_first,
            "split_operands": args.split_operands, "feed": args.feed}
    if args.precision != "tf32x3":
        meta["accuracy_vs_tf32x3"] = accuracy(model, args.kind)
    cuda = device.type == "cuda"
    print(f"# {args.kind} engine, {args.preset}, {meta['device']}, backend {meta['backend']}, step mode "
          f"{args.step_mode}, {meta['tiles']} tiles, precision {args.precision} (upsampling "
          f"{meta['upsampling_precision']}, product {args.upsampling_product}), rows-first {args.rows_first}, "
          f"split operands {args.split_operands}, "
          f"{args.phases} phase(s), input fed from the {args.feed}, {meta['date']}, "
          f"commit {meta['commit']}")
    if "accuracy_vs_tf32x3" in meta:
        print(f"accuracy against precision tf32x3 (offline, 4 x 2 s): {meta['accuracy_vs_tf32x3']}")
    print("| streams | step p50 (ms) | p95 | p99 | budget (ms) | real time | aggregate x real time | host p50 (ms) |"
          + (" GPU p50 (ms) | GPU p95 | peak GiB | peak MiB per stream | first step (ms) | graph replay GPU (ms) |"
             if cuda else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|---|---|---|---|" if cuda else ""))
    rows = []
    from snac_stream.kernels import conv

    forms = conv.rows_first_products(args.rows_first == "on") if args.rows_first != "rule" else nullcontext()
    split = conv.split_operands(args.split_operands == "on") if args.split_operands != "rule" else nullcontext()
    with torch.inference_mode(), forms, split:
        for n in args.streams:
            r = measure(model, args.kind, n, args.steps, args.backend, args.step_mode, args.profile,
                        not args.no_gc_freeze, args.phases, args.feed)
            rows.append(r)
            extra = (f" {r['gpu_p50_ms']:.3f} | {r['gpu_p95_ms']:.3f} | {r['peak_memory_gib']:.2f} "
                     f"| {r['peak_memory_mib_per_stream']:.2f} | {r['first_batched_step_ms']:.0f} | {r.get('replay_gpu_ms', float('nan')):.3f} |"
                     if cuda else "")
            print(f"| {n} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['p99_ms']:.3f} | {r['budget_ms']:.1f} "
                  f"| {'yes' if r['realtime'] else 'no'} | {r['aggregate_rtf']:.1f} | {r['host_p50_ms']:.3f} |" + extra, flush=True)
    capacity = max([r["streams"] for r in rows if r["realtime"]], default=0)
    print(f"capacity (largest measured N with p95 inside the budget): {capacity} streams; "
          f"state per stream: {rows[0]['state_bytes_per_stream'] / 1024:.1f} KiB")
    ref = reference_rows(model, args.streams) if args.reference else {}
    if ref:
        print(f"reference snac: Orpheus-style window {ref['orpheus_window_ms']:.2f} ms per {model.config.frame_samples}"
              f" samples (batch 1); offline 64 x 10 s {ref['offline_64x10s_ms']:.1f} ms "
              f"({ref['offline_64x10s_realtime_x']:.0f}x real time)")
        print("reference snac, the window batched over N streams"
              + (" in a CUDA graph" if cuda else "") + ": " + ", ".join(
                  f"{n}: {'out of memory' if ms is None else f'{ms:.2f} ms'}"
                  for n, ms in ref["window_steps_ms"].items()))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "capacity": capacity, "reference": ref},
                                        indent=2))
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot")
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["streams"] for r in rows]
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            ax.plot(xs, [r[key] for r in rows], marker="o", label=key.split("_")[0])
        reference = [(n, ms) for n, ms in ref.get("window_steps_ms", {}).items() if ms is not None]
        if reference:
            ax.plot(*zip(*reference), marker="s", color="gray",
                    label="reference snac, batched window" + (" (CUDA graph)" if cuda else ""))
        ax.axhline(rows[0]["budget_ms"], color="k", linestyle="--", label="real-time budget")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("step latency (ms)")
        ax.set_title(f"{args.preset} {args.kind} engine, {meta['device']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
