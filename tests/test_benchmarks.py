"""The benchmark scripts still run (tiny sizes; no timing is asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_speed_benchmark_times_both_paths_at_equal_batch(tmp_path):
    out = tmp_path / "speed.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--sizes", "300", "--paper-max", "300",
         "--k", "16", "--out", str(out)],
        check=True, capture_output=True, text=True,
    )
    result = json.loads(out.read_text())
    (row,) = result["scaling"]
    assert row["entities"] == 300 and row["cache_bytes_per_entity_fp16"] == 18995  # the exact cache
    assert row["paper_batch1_s_per_mention"] > 0 and row["speedup_batch1_warm"] > 0
    for batch in (1, 32):
        assert row[f"two_stage_batch{batch}"]["cold_s_per_mention"] > 0
    assert result["machine"]["device"] == "cpu" and "torch" in result["versions"]
