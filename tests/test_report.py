"""staterank report: a self-contained HTML page and a Markdown file from a run directory."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import pytest

from staterank import layout
from staterank.cli import main
from staterank.report import write_report


def write_eval(run_dir, model, result):
    """What `staterank evaluate --out` writes (it names the model and the corpus), where the run layout puts it."""
    layout.eval_path(run_dir, model, result["data"]).write_text(json.dumps({"model": model, **result}))


def fake_run(run_dir):
    (run_dir / "analysis").mkdir(parents=True)
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
    (run_dir / "analysis" / "rank_heatmap.png").write_bytes(png)
    (run_dir / "analysis" / "rank.json").write_text(json.dumps({
        "stratification": {"low": 3, "high": 5, "gap": 0.25}, "stability": {"across_samples_spearman": 0.9}}))
    write_eval(run_dir, "/models/tiny", {"data": "techdocs-val", "ppl": 16.2})
    write_eval(run_dir, "/runs/tiny-pruned", {"data": "techdocs-val", "ppl": 19.4})
    (run_dir / "bench.json").write_text(json.dumps({
        "device": "cpu", "dtype": "float32", "batch_size": 8, "seq_len": 2048,
        "models": [{"name": "tiny", "prefill_tokens_per_s": 1000.0, "decode_ms_per_token": {"1": 2.0},
                    "decode_graph_ms_per_token": {"1": 0.75}, "state_bytes_per_seq": 100}]}))


def test_report_embeds_every_image_and_references_existing_files(tmp_path):
    fake_run(tmp_path)
    markdown, page = write_report(tmp_path)
    text = page.read_text()
    assert "<h2>Perplexity</h2>" in text and "16.20" in text and "19.40" in text and "1,000" in text and "0.75" in text
    images = re.findall(r'<img[^>]*src="([^"]+)"', text)
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") for src in images)  # self-contained
    for src in images:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown.read_text()):
        assert (tmp_path / target).is_file()


def test_nothing_to_report(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "nothing to report" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_report_renders_in_headless_chromium(tmp_path):
    fake_run(tmp_path)
    _, page = write_report(tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 5000


def test_perplexity_against_ratio_and_recall_are_reported(tmp_path):
    from staterank.report import _ratio_points, collect

    fake_run(tmp_path)
    write_eval(tmp_path, "/models/tiny", {"data": "techdocs-val", "ppl": 16.2})
    for method, ratio, ppl in (("rrqr", 0.25, 17.0), ("rrqr", 0.5, 19.4), ("l1", 0.5, 29.9)):
        folder = tmp_path / f"{method}-{ratio}"
        folder.mkdir()
        (folder / "pruning.json").write_text(json.dumps({
            "model": "/models/tiny", "method": method, "ratio": ratio, "head_k_dim_before": 64,
            "head_k_dim_after": 48, "kept": {}, "state_bytes_before": 10, "state_bytes_after": 8}))
        write_eval(tmp_path, str(folder), {"data": "techdocs-val", "ppl": ppl})
    recall = {"copy": {"length": 16, "distance": [32, 128], "accuracy": [0.5, 0.25], "chance": 0.001},
              "kv": {"items": [4], "accuracy": [0.125], "chance": 0.001}}
    write_eval(tmp_path, "/models/tiny", {"data": None, "recall": recall})
    found = collect(tmp_path)
    # l1 ran at one ratio only: no curve; rrqr's starts at the unpruned model's 16.2
    assert _ratio_points(found, "techdocs-val") == {"rrqr": [(0.0, 16.2), (0.25, 17.0), (0.5, 19.4)]}
    assert found["recall"] == {"tiny": recall}
    markdown, page = write_report(tmp_path)
    assert (tmp_path / "perplexity_vs_ratio.png").is_file()
    assert "perplexity_vs_ratio.png" in markdown.read_text()
    text = page.read_text()
    assert "copy 16 tokens at 128" in text and "0.250" in text and "lookup of 4 pairs" in text and "0.125" in text
    assert len(re.findall(r'<img[^>]*src="data:image/png;base64,', text)) == 3


def test_headline_opens_the_report_with_state_perplexity_recall_and_speed(tmp_path):
    pruned = tmp_path / "rrqr-50"
    pruned.mkdir()
    (pruned / "pruning.json").write_text(json.dumps({
        "method": "rrqr", "ratio": 0.5, "kept": {}, "head_k_dim_before": 64, "head_k_dim_after": 32,
        "state_bytes_before": 1000, "state_bytes_after": 400}))  # fmt: skip
    write_eval(tmp_path, "/models/tiny", {"data": "techdocs-val", "ppl": 16.2})
    write_eval(tmp_path, "/runs/rrqr-50-lora", {"data": "techdocs-val", "ppl": 19.4})
    mqar = {"pairs": 16, "seq_len": 128, "examples": 300, "num_values": 128}
    write_eval(tmp_path, "/models/recall", {"data": "mqar", "mqar": {**mqar, "accuracy": 0.99}})
    write_eval(tmp_path, "/runs/a-recall-pruned", {"data": "mqar", "mqar": {**mqar, "accuracy": 0.5}})
    (tmp_path / "a-recall-pruned").mkdir()
    (tmp_path / "a-recall-pruned" / "pruning.json").write_text((pruned / "pruning.json").read_text())
    (tmp_path / "bench.json").write_text(json.dumps({
        "device": "cpu", "dtype": "float32", "batch_size": 8, "seq_len": 2048, "models": [
            {"name": "/models/tiny", "prefill_tokens_per_s": 1000.0, "decode_ms_per_token": {"1": 2.0, "16": 8.0},
             "decode_graph_ms_per_token": None, "state_bytes_per_seq": 1000},
            {"name": "/runs/rrqr-50-lora", "prefill_tokens_per_s": 1250.0, "decode_ms_per_token": {"1": 2.0, "16": 5.0},
             "decode_graph_ms_per_token": None, "state_bytes_per_seq": 400}]}))  # fmt: skip
    markdown, _ = write_report(tmp_path)
    text = markdown.read_text()
    head = text[: text.index("## Pruning")]  # the headline comes before every detail
    assert "## Headline" in head
    assert "400 bytes per sequence against 1,000 (2.50x smaller)" in head
    assert "Perplexity on techdocs-val: tiny 16.20; rrqr-50-lora 19.40." in head
    assert "MQAR recall (16 pairs, 128 tokens): recall 0.990; a-recall-pruned 0.500." in head
    assert "rrqr-50-lora prefills 1.25x as fast and decodes 1.60x as fast at batch 16 (eager, cpu)" in head
    assert "| recall | 16 | 128 | 300 | 0.9900 |" in text  # the MQAR table
