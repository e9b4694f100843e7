"""``snac-stream bench-latency --sample-format/--sample-rate``: real-time clients in the client formats the
server converts (G.711 at 8 kHz, Opus), their latency per output sample, the announced added latency and the
server process's CPU time; bad combinations are clear CLI errors. Kept short: a tiny random-weight model, two
clients, 1.5 s each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from helpers import run_cli, single_error
from snac_stream.cli import main
from test_ops import save_checkpoint

pytest.importorskip("av")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("bench") / "tiny")


def bench(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, *argv: str) -> Tuple[Dict[str, Any], str]:
    """(the JSON report, the summary printed on stderr) of a short run."""
    path = tmp_path / "bench.json"
    rc = main(["bench-latency", "--model", str(checkpoint), "--clients", "2", "--duration", "1.5", "--device", "cpu",
               "--threads", "1", "--json", str(path), *argv])
    err = capsys.readouterr().err
    assert rc == 0, err
    return json.loads(path.read_text()), err


def check_sane(report: Dict[str, Any], encoder_lookahead_s: float = 0.0) -> None:
    """No error, every stream complete, each latency part finite and within what the session announced."""
    assert report["errors"] == 0 and report["incomplete_streams"] == 0 and not report["server_errors"]
    assert report["converted"] and report["input_latency_samples"] > 0 and report["output_latency_samples"] > 0
    latency = report["latency_ms"]
    # The conversions' hold is algorithmic: at least the output's own, at most the announced bound plus one
    # message (and the clients' own Opus encoder's look-ahead).
    bound_ms = 1e3 * (report["algorithmic_latency_samples"] / report["sample_rate"]
                      + report["chunk_samples"] / report["client_sample_rate"] + encoder_lookahead_s)
    assert report["added_latency_ms"]["output"] < latency["algorithmic"]["p50"]
    assert latency["algorithmic"]["max"] <= bound_ms
    assert 0 <= latency["server"]["p50"] <= latency["server"]["max"] < 5000
    assert latency["algorithmic"]["p50"] < latency["total"]["p50"] < latency["algorithmic"]["max"] + 5000
    # The server process's CPU over the streams' window, split by thread.
    cpu = report["server_cpu"]
    assert cpu["window_s"] >= 1.5 and 0 < cpu["cpu_per_wall_s"] < 2
    assert set(cpu["threads_cpu_per_wall_s"]) == {"event_loop", "engine", "thread_pool", "other"}
    assert cpu["threads_cpu_per_wall_s"]["engine"] > 0
    # The client workers' own CPU, or none apart when the clients ran in the server's process.
    clients_cpu = report["client_cpu"]
    if cpu["clients_included"]:
        assert clients_cpu is None
    else:
        assert clients_cpu["processes"] == report["client_processes"] == len(clients_cpu["per_process"])
        assert clients_cpu["max_process_cpu_per_wall_s"] == max(clients_cpu["per_process"]) >= 0


def test_mulaw_8k_clients(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report, out = bench(checkpoint, tmp_path, capsys, "--sample-format", "mulaw")  # 8000 Hz: G.711's default
    assert report["sample_format"] == "mulaw" and report["client_sample_rate"] == 8000
    assert report["chunk_samples"] == 160 and report["client_processes"] == 1
    assert not report["server_cpu"]["clients_included"]
    check_sane(report)
    assert "mulaw at 8000 Hz" in out and "latency positions: output samples at 8000 Hz" in out
    assert "cpu     server process" in out


def test_opus_clients(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report, out = bench(checkpoint, tmp_path, capsys, "--sample-format", "opus", "--client-processes", "0")
    assert report["sample_format"] == "opus" and report["client_sample_rate"] == 48000
    assert report["chunk_samples"] == 960 and report["server_cpu"]["clients_included"]
    check_sane(report, encoder_lookahead_s=0.0065)
    assert "samples of the decoded 48 kHz Opus stream" in out


def test_mulaw_8k_decode_clients(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--kind decode``: the format is the output's only; its conversion's hold is the algorithmic latency's
    part beyond the decode sessions' own, and the streams arrive complete at 8 kHz."""
    report, out = bench(checkpoint, tmp_path, capsys, "--kind", "decode", "--sample-format", "mulaw",
                        "--client-processes", "1")
    assert report["kind"] == "decode" and report["sample_format"] == "mulaw" and report["client_sample_rate"] == 8000
    assert report["errors"] == 0 and report["incomplete_streams"] == 0 and not report["server_errors"]
    assert report["converted"] and report["input_latency_samples"] is None and report["output_latency_samples"] > 0
    assert report["added_latency_ms"] == {"input": None, "output": pytest.approx(
        1e3 * report["output_latency_samples"] / 8000)}
    latency = report["latency_ms"]
    # Tokens in whole steps: the algorithmic part is within the announced bound, the output's hold at least.
    assert report["added_latency_ms"]["output"] < latency["algorithmic"]["p50"]
    assert latency["algorithmic"]["max"] <= 1e3 * report["algorithmic_latency_samples"] / report["sample_rate"] + 1e-3
    assert 0 <= latency["server"]["p50"] <= latency["server"]["max"] < 5000
    assert "mulaw at 8000 Hz" in out and "adds out " in out and "latency positions: output samples at 8000 Hz" in out


@pytest.mark.parametrize("argv, needle", [
    (["--sample-format", "opus", "--sample-rate", "8000"], "Opus streams are 48000 Hz by definition"),
    (["--sample-format", "mulaw", "--sample-rate", "4000"], "sample_rate 4000 Hz is out of range: 8000..48000 Hz"),
    (["--sample-format", "webm", "--chunk-ms", "25"], "one Opus frame a message: the message must be 10, 20, 40 or 60"),
])
def test_bad_client_formats_are_clear_errors(checkpoint: Path, capsys: pytest.CaptureFixture, argv: List[str],
                                             needle: str) -> None:
    rc, err = run_cli(["bench-latency", "--model", str(checkpoint), "--device", "cpu", *argv], capsys)
    line = single_error(err)
    assert rc == 2 and needle in line and line.startswith(f"error: --sample-format {argv[1]}")
