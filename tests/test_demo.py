"""The README's first command: the demo runs end to end on the bundled model, and its terminal stays clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_demo_runs_and_prints_no_third_party_warning(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "staterank", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # tiny models: a second thread only waits
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Nothing but staterank's own lines: no FutureWarning, DeprecationWarning or "[transformers] ..." log.
    assert done.stderr == "", done.stderr[-3000:]
    assert "Warning" not in done.stdout and "deprecated" not in done.stdout
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    for pruned in ("rrqr-50", "l1-50"):
        report = json.loads((out / pruned / "pruning.json").read_text())
        assert report["kept_ratio"] == report["ratio"] == 0.5
        assert (out / pruned / "README.md").is_file() and (out / f"{pruned}-lora" / "README.md").is_file()
    # the recall part: the bundled recall model recalls, pruning changes its recall, the report says so
    recall = {
        name: json.loads((out / f"eval-{name}-mqar.json").read_text())["mqar"]["accuracy"]
        for name in ("mqar-deltanet", "mqar-rrqr-50", "mqar-rrqr-50-lora")
    }
    assert recall["mqar-deltanet"] > 0.9 and recall["mqar-rrqr-50"] != recall["mqar-deltanet"]
    report = (out / "report.md").read_text()
    assert report.index("## Headline") < report.index("## Pruning") and "MQAR recall" in report
