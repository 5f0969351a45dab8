"""benchmarks/reproduce.py --smoke: the whole study on tiny models, checked against independent computations."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr

from staterank import api
from staterank.prune.channels import CHANNEL_CRITERIA
from staterank.prune.heads import HEAD_CRITERIA

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"
MODELS = ("deltanet", "gated-deltanet")
CHANNEL_RATIOS, HEAD_RATIOS = (0.25, 0.5, 0.75), (0.2, 0.4)
CORPORA = {"techdocs-val": "ppl_techdocs_val", "wikitext-test": "ppl_wikitext2"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "run"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--keep-models", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        # One thread: these tiny models gain nothing from two, and on a busy machine idle threads spin.
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    return out, results, done.stderr


def rows_of(results, model, kind=None):
    return [r for r in results["rows"] if r["model"] == model and (kind is None or r["kind"] == kind)]


def evaluate_like_the_run(path, options) -> dict[str, float]:
    return {
        key: api.evaluate(
            path, data, seq_len=options["eval_seq_len"], max_tokens=options["eval_tokens"], device="cpu", progress=False
        )["ppl"]
        for data, key in CORPORA.items()
    }


def cache_state_bytes(path) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes of the states the model itself caches for one sequence, and each layer's recurrent-state shape."""
    loaded = api.load_model(path, device="cpu")
    with torch.no_grad():
        cache = loaded.model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6, 7]]), use_cache=True).past_key_values
    total, shapes = 0, []
    for layer in range(len(cache)):
        for value in cache[layer].values():
            tensors = value if isinstance(value, tuple) else (value,)
            total += sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))
        shapes.append(tuple(loaded.adapter.cached_state(cache, layer).shape))  # [1, H, d_k, d_v] in any layout
    return total, shapes


def test_every_method_and_ratio_has_a_row(run):
    _, results, stderr = run
    assert results["complete"]
    for model in MODELS:
        got = {(r["kind"], r["method"], r["ratio"], r["stage"]) for r in rows_of(results, model)}
        expected = {("none", "none", 0.0, "trained")}
        expected |= {("channels", m, r, "pruned") for m in CHANNEL_CRITERIA for r in CHANNEL_RATIOS}
        expected |= {("heads", m, r, "pruned") for m in HEAD_CRITERIA for r in HEAD_RATIOS}
        expected |= {("recovery", m, 0.5, s) for m in ("rrqr", "l1") for s in ("lora", "lora+kd")}
        assert got == expected
        assert len(rows_of(results, model)) == len(expected)  # no row twice
    assert {s["stage"] for s in results["stages"]} >= {f"{m}: train" for m in MODELS}
    assert all(f"] {s['stage']}: {s['seconds']:.1f} s" in stderr for s in results["stages"])  # progress on stderr
    assert results["kernels"]["torch_kernels"] == "all" and results["seed"] == 0


def test_rows_are_the_saved_models_evaluated(run):
    out, results, _ = run
    options = results["options"]
    for model in MODELS:
        base = rows_of(results, model, "none")[0]
        # The unpruned row is the trained model, and the pruned and recovered rows are their saved models
        # (one row of each kind per model, the stages alternating between the models to keep this quick).
        chosen = {
            ("rrqr", 0.5, "pruned"),
            ("jrnp", 0.4, "pruned"),
            ("l1", 0.5, "lora+kd" if model == "deltanet" else "lora"),
        }
        picks = [base] + [r for r in rows_of(results, model) if (r["method"], r["ratio"], r["stage"]) in chosen]
        assert len(picks) == 4
        for row in picks:
            expected = evaluate_like_the_run(out / row["path"], options)
            for key, ppl in expected.items():
                assert row[key] == pytest.approx(ppl, rel=1e-9), (model, row["method"], row["stage"], key)
        assert base["path"] == f"models/{model}"
        pruned = [r for r in picks if r["kind"] != "none"]
        assert all(r["ppl_techdocs_val"] != base["ppl_techdocs_val"] for r in pruned)


def test_state_bytes_follow_the_ratio_in_the_models_own_cache(run):
    out, results, _ = run
    for model in MODELS:
        base = rows_of(results, model, "none")[0]
        base_bytes, base_shapes = cache_state_bytes(out / base["path"])
        assert base["state_bytes"] == base_bytes
        heads, d_k = base_shapes[0][1], base_shapes[0][2]
        assert (base["heads_per_layer"], base["head_k_dim"]) == (heads, d_k) == (4, 16)
        for row in rows_of(results, model, "channels") + rows_of(results, model, "heads"):
            row_bytes, shapes = cache_state_bytes(out / row["path"])
            assert row["state_bytes"] == row_bytes
            if row["kind"] == "channels":  # floor(d_k (1 - ratio)); below 16 channels no alignment applies
                expected = (1, heads, math.floor(d_k * (1 - row["ratio"])), base_shapes[0][3])
            else:
                expected = (1, heads - round(row["ratio"] * heads), d_k, base_shapes[0][3])
            assert all(shape == expected for shape in shapes), (model, row["method"], row["ratio"])
            assert (row["heads_per_layer"], row["head_k_dim"]) == expected[1:3]


def test_training_and_analysis_records(run):
    out, results, _ = run
    for model in MODELS:
        record = results["training"][model]
        written = json.loads((out / "models" / model / "training.json").read_text())
        assert record["tokens_seen"] == record["steps"] * record["batch_size"] * record["seq_len"]
        # The time budget became a step count through the measured seconds per step (the path a GPU run takes).
        assert record["steps_from"] == "--train-seconds" and record["steps"] == written["steps"]
        assert record["steps"] == max(1, int(results["options"]["train_seconds"] / record["probe_seconds_per_step"]))
        assert record["val_ppl"] == pytest.approx(math.exp(written["val_history"][-1]["loss"]))
        assert record["params"] == rows_of(results, model, "none")[0]["params"]

        analysis = results["analysis"][model]
        ranks = json.loads((out / analysis["rank_json"]).read_text())
        heads = [h for layer in ranks["layers"] for h in layer["heads"]]
        assert analysis["low"] + analysis["high"] == len(heads) == 2 * 4
        assert analysis["low"] == sum(h["group"] == "low" for h in heads)
        a, b = (domain["final_effective_rank"] for domain in ranks["domains"])
        with warnings.catch_warnings():  # constant ranks (an untrained DeltaNet fills every state) warn
            warnings.simplefilter("ignore")
            rho = spearmanr(a, b).statistic
        if math.isnan(rho):  # constant ranks: undefined, recorded as null
            assert analysis["across_domains_spearman"] is None
        else:
            assert analysis["across_domains_spearman"] == pytest.approx(rho)


def test_markdown_tables_hold_the_rows(run):
    out, results, _ = run
    lines = (out / "results.md").read_text().splitlines()
    for row in results["rows"]:
        if row["kind"] not in ("channels", "heads"):
            continue
        line = next(line for line in lines if line.startswith(f"| {row['model']} | {row['method']} |"))
        assert f"{row['ppl_techdocs_val']:.2f} / {row['ppl_wikitext2']:.2f}" in line
    recovery = [r for r in results["rows"] if r["kind"] == "recovery"]
    for row in recovery:
        assert any(line.startswith(f"| {row['model']} | {row['method']} | {row['stage']} |") for line in lines)


STUDY_MODELS = ("deltanet", "gated-deltanet", "kda", "rwkv7", "mamba2")


@pytest.fixture(scope="module")
def stratification_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "run"
    argv = [sys.executable, str(SCRIPT), "--smoke", "--stratification-study", "--train-steps", "6", "--models",
            *STUDY_MODELS, "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_the_stratification_study_trains_and_analyses_every_architecture_alike(stratification_study):
    """Five state rules, the same data and tokens, analysed alike: every head of every model is in its group by
    the split's threshold on its final effective rank over its capacity, and the plot is written."""
    out, results = stratification_study
    assert list(results["analysis"]) == list(STUDY_MODELS)
    assert {results["training"][m]["tokens_seen"] for m in STUDY_MODELS} == {6 * 4 * 64}  # the same budget
    assert all(row["kind"] == "none" for row in results["rows"])  # no pruning, no recovery
    for model in STUDY_MODELS:
        analysis = results["analysis"][model]
        ranks = json.loads((out / analysis["rank_json"]).read_text())
        loaded = api.load_model(out / "models" / model, device="cpu")
        assert analysis["heads"] == sum(s.num_v_heads for s in loaded.adapter.shapes())
        threshold = ranks["stratification"]["threshold"]
        for layer in ranks["layers"]:
            capacity = min(layer["head_k_dim"], layer["head_v_dim"])
            for head in layer["heads"]:
                high = head["effective_rank"][-1] / capacity > threshold
                assert head["group"] == ("high" if high else "low"), (model, layer["layer"], head)
    assert (out / "stratification.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![every head's final effective rank" in (out / "results.md").read_text()


def test_a_resumed_study_keeps_the_finished_models_and_runs_the_others(tmp_path):
    """A study stopped after one model, resumed with more: the finished model's training, analysis, rows and
    rank.json are kept as measured (the resumed run trains only the new one), the plot is drawn again, and the
    run says what it kept; resuming with other options is refused in one line, exit code 2."""
    out = tmp_path / "run"
    base = [sys.executable, str(SCRIPT), "--smoke", "--stratification-study", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*base, "--train-steps", "2", "--models", "rwkv7"], capture_output=True, text=True,
                           timeout=300, env=env)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.loads((out / "results.json").read_text())
    rank_json = (out / "analysis" / "rwkv7" / "rank.json").read_bytes()
    weights = (out / "models" / "rwkv7" / "model.safetensors").stat().st_mtime_ns
    resumed = subprocess.run([*base, "--train-steps", "2", "--models", "deltanet", "rwkv7", "--resume"],
                             capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = json.loads((out / "results.json").read_text())
    assert after["complete"] and after["resumed"]["kept_models"] == ["rwkv7"]
    assert after["resumed"]["from_date"] == before["date"]
    assert after["training"]["rwkv7"] == before["training"]["rwkv7"]
    assert after["analysis"]["rwkv7"] == before["analysis"]["rwkv7"]
    assert [r for r in after["rows"] if r["model"] == "rwkv7"] == before["rows"]
    assert (out / "analysis" / "rwkv7" / "rank.json").read_bytes() == rank_json
    assert (out / "models" / "rwkv7" / "model.safetensors").stat().st_mtime_ns == weights  # not retrained
    assert set(after["analysis"]) == {"rwkv7", "deltanet"}
    assert "rwkv7: train" not in [s["stage"] for s in after["stages"][len(before["stages"]) :]]
    assert (out / "stratification.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    other = subprocess.run([*base, "--train-steps", "3", "--models", "rwkv7", "--resume"], capture_output=True,
                           text=True, timeout=300, env=env)  # fmt: skip
    assert other.returncode == 2
    refusal = f"reproduce: error: --resume: the run in {out} was made with other train_steps"
    assert other.stderr.strip().splitlines()[-1] == refusal
