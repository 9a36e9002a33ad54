"""The benchmark's quick mode runs end to end (smoke test; speed is never asserted)."""

import json

import pytest
from matplotlib.image import imread

from batchfit.app.cli import main


@pytest.mark.slow  # (an end-to-end run of the whole command)
def test_quick_bench_writes_table_json_and_plot(tmp_path, capsys):
    assert main(["bench", "--quick", "--sizes", "300", "--json", str(tmp_path / "b.json"),
                 "--plot", str(tmp_path / "b.png")]) == 0
    out = capsys.readouterr().out
    for method in ["numpy.polyfit loop", "numpy.polyfit, 2-D y", "torch.linalg.lstsq",
                   "batchfit exact (moments)", "batchfit newton huber",
                   "naive vmap(grad) GD loop", "floor: read x and y once",
                   "scipy least_squares huber loop",
                   "duckdb GROUP BY power sums + numpy solve",
                   "polars GROUP BY power sums + numpy solve",
                   "scipy least_squares loop, peaks", "batchfit newton (LM) peaks"]:
        assert method in out
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["machine"]["cores"] >= 1 and result["rows"]
    verdicts = {r["method"]: r["verdict"] for r in result["rows"]}
    assert verdicts["batchfit exact (moments)"] == "ok"  # checked against float64 polyfit
    assert verdicts["duckdb GROUP BY power sums + numpy solve"] == "ok"
    assert verdicts["batchfit newton huber, compile=False"] == "ok"  # and against scipy
    assert verdicts["batchfit newton (LM) peaks, compile=False"] == "ok"
    assert "WRONG" not in verdicts.values()
    assert imread(tmp_path / "b.png").shape[1] > 500
