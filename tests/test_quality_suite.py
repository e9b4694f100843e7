"""The quality suite (bench/quality.py) runs end to end on the bundled model and its figures say what they should:
streaming equals offline, the trained model is intelligible and its untrained twin is not."""

from __future__ import annotations

import json

import pytest
from helpers import load_bench


@pytest.fixture(scope="module")
def quality():
    return load_bench("quality")


def test_quality_suite_on_the_bundled_model(quality, tmp_path, capsys):
    out = tmp_path / "quality.json"
    assert quality.main(["--clips", "1", "--formats", "mulaw", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = {(r["model"], r["condition"]): r for r in json.loads(out.read_text())["rows"]}
    assert {model for model, _ in rows} == {"mini", "mini untrained"}
    conditions = {c for _, c in rows}
    assert conditions == {"offline", "streaming", "dial 0", "dial 512", "dial 1024", "dial 2048",
                          "format mulaw @ 8000 Hz"}
    for model in ("mini", "mini untrained"):
        assert rows[model, "streaming"]["max_abs_diff_vs_offline"] < 1e-4
        assert rows[model, "streaming"]["stoi"] == pytest.approx(rows[model, "offline"]["stoi"], abs=1e-3)
    assert rows["mini", "offline"]["stoi"] >= 0.8
    assert rows["mini untrained", "offline"]["stoi"] < 0.6
    assert rows["mini", "offline"]["mel"] < rows["mini untrained", "offline"]["mel"]
    assert rows["mini", "format mulaw @ 8000 Hz"]["stoi"] >= 0.7
    assert "| mini | offline |" in table


def test_quality_suite_refuses_unknown_formats(quality):
    with pytest.raises(SystemExit):
        quality.main(["--formats", "mp3"])
