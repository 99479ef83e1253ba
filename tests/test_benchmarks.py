"""The benchmark scripts still run (tiny sizes; no timing is asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_speed_benchmark_runs_and_reports_cache_size_and_agreement(tmp_path):
    out = tmp_path / "speed.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--sizes", "300", "--paper-max", "300",
         "--k", "16", "--pipe-docs", "0", "--pipeline", str(tmp_path / "none"), "--out", str(out)],
        check=True, capture_output=True, text=True,
    )
    result = json.loads(out.read_text())
    (row,) = result["scaling"]
    assert row["entities"] == 300 and row["max_cached_queries"] == 12
    assert row["cache_bytes_per_entity_fp16"] == 6385 < row["cache_bytes_per_entity_fp16_all_queries"] == 18995
    assert row["paper_s_per_mention"] > 0 and row["two_stage_s_per_mention"] > 0
    assert 0.0 <= row["agreement_synthetic"] <= 1.0
    assert result["machine"]["device"] == "cpu" and "torch" in result["versions"]
