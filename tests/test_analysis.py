"""staterank analyze: the JSON contract, agreement with the model's own cache, outputs, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from reference import tiny_config
from transformers import AutoModelForCausalLM

from staterank import api
from staterank.cli import main
from staterank.data import load_sequences, read_documents
from staterank.loading import prepare_runtime
from staterank.rank import spectral_metrics
from staterank.tokenizer import train_tokenizer

prepare_runtime("gated_deltanet")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((doc[:3000] for doc in read_documents("techdocs-val")), vocab_size=300)


@pytest.fixture(scope="module", params=["gated_deltanet", "qwen3_next"])
def model_dir(request, tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(request.param, len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_final_metrics_equal_those_of_the_models_own_cache(model_dir, tmp_path):
    seq_len, samples = 100, 2
    result = api.analyze(model_dir, "techdocs-val", tmp_path / "out", samples=samples, seq_len=seq_len, seed=3,
                         progress=False)
    assert result["positions"][-1] == seq_len and result["eps"] == 1e-4
    loaded = api.load_model(model_dir)
    sequences = load_sequences("techdocs-val", loaded.tokenizer, seq_len, max_tokens=samples * seq_len, shuffle=True,
                               seed=3)
    with torch.no_grad():
        cache = loaded.model(input_ids=sequences, use_cache=True).past_key_values
    for layer in result["layers"]:
        expected = spectral_metrics(loaded.adapter.cached_state(cache, layer["layer"]).double())  # [B, Hv]
        for head in layer["heads"]:
            for metric in ("effective_rank", "stable_rank", "entropy_rank", "nuclear_norm", "rank_utilization"):
                mean = expected[metric][:, head["head"]].mean().item()
                assert head[metric][-1] == pytest.approx(mean, rel=1e-4, abs=1e-6), (layer["layer"], head, metric)
            assert head["group"] in ("low", "high")


def test_outputs_and_two_domains(model_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    argv = ["analyze", str(model_dir), "--data", "techdocs-val", "--data", "wikitext-test", "--samples", "2",
            "--seq-len", "64", "--positions", "1,8,64", "--out", str(out)]
    assert main(argv) == 0
    assert "high-rank heads" in capsys.readouterr().out
    result = json.loads((out / "rank.json").read_text())
    assert result["positions"] == [1, 8, 64]
    heads = [h for layer in result["layers"] for h in layer["heads"]]
    assert len(heads) == 4 * len(result["layers"]) and all(len(h["effective_rank"]) == 3 for h in heads)
    assert all(h["effective_rank"][0] == 1.0 for h in heads)  # one token: a rank-one state
    assert result["stratification"]["low"] + result["stratification"]["high"] == len(heads)
    assert "across_domains_spearman" in result["stability"] and len(result["domains"]) == 2
    for name in ("effective_rank.csv", "stable_rank.csv", "rank_heatmap.png", "rank_trajectories.png",
                 "spectra.png", "cross_domain.png"):
        assert (out / name).stat().st_size > 0
    rows = (out / "effective_rank.csv").read_text().splitlines()
    assert rows[0] == "layer,head,group,t=1,t=8,t=64" and len(rows) == 1 + len(heads)


def test_bad_input(model_dir, tmp_path, capsys, tokenizer):
    base = ["analyze", str(model_dir), "--data", "techdocs-val", "--out", str(tmp_path / "o"), "--seq-len", "32"]
    for extra, message in [
        (["--eps", "0"], "--eps"),
        (["--eps", "1.5"], "--eps"),
        (["--positions", "10,64"], "beyond the sequence length"),
    ]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()

    no_linear = tmp_path / "all-full-attention"
    config = tiny_config("qwen3_next", len(tokenizer))
    config.layer_types = ["full_attention"] * 3
    AutoModelForCausalLM.from_config(config).save_pretrained(no_linear)
    tokenizer.save_pretrained(no_linear)
    assert main(["analyze", str(no_linear), "--data", "techdocs-val", "--out", str(tmp_path / "o")]) == 2
    assert "no linear-attention layers" in capsys.readouterr().err


def test_final_state_equals_the_cached_state(model_dir):
    from staterank.rank import states_at

    loaded = api.load_model(model_dir)
    ids = torch.randint(0, 300, (2, 150), generator=torch.Generator().manual_seed(0))
    features = {}
    with torch.no_grad(), loaded.adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        cache = loaded.model(input_ids=ids, use_cache=True).past_key_values
    for layer, f in features.items():
        final = states_at(f, [150])[0]  # [B, Hv, d_k, d_v]
        torch.testing.assert_close(final, loaded.adapter.cached_state(cache, layer).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernels", ["torch", "fla"])
def test_the_forward_runs_on_the_kernels_asked_for(model_dir, tmp_path, monkeypatch, kernels):
    """--kernels torch routes every patched operation to staterank's PyTorch kernels for the analysis only."""
    from staterank import analysis, backends

    seen = []
    collect = analysis.collect_metrics

    def watched(*args, **kwargs):
        seen.append(backends.torch_kernels())
        return collect(*args, **kwargs)

    monkeypatch.setattr(analysis, "collect_metrics", watched)
    before = backends.torch_kernels()
    result = api.analyze(model_dir, "techdocs-val", tmp_path / "out", samples=1, seq_len=32, kernels=kernels,
                         progress=False)
    assert seen == ["all" if kernels == "torch" else before]
    assert backends.torch_kernels() == before
    assert json.loads((tmp_path / "out" / "rank.json").read_text())["kernels"] == result["kernels"] == kernels
