"""Head pruning: Saturation Scores, which heads go, real removal, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from reference import tiny_config
from transformers import AutoModelForCausalLM

from staterank import api
from staterank.cli import main
from staterank.data import read_documents
from staterank.loading import prepare_runtime
from staterank.models import LayerShape, adapter_for
from staterank.prune.heads import HeadProfile, get_head_criterion, heads_to_remove, heads_to_remove_globally
from staterank.tokenizer import train_tokenizer

prepare_runtime("gated_deltanet")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((doc[:3000] for doc in read_documents("techdocs-val")), vocab_size=300)


def save_tiny(path, model_type, tokenizer):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(model_type, len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(5))


def test_saturation_score_by_hand():
    profile = HeadProfile(order=[(0, 0), (0, 1), (1, 0), (1, 1)],
                          effective_rank=torch.tensor([10.0, 30.0, 20.0, 50.0]),
                          nuclear_norm=torch.tensor([4.0, 1.0, 2.0, 3.0]))
    generator = torch.Generator()
    # min-max: rank (10, 30, 20, 50) -> (0, .5, .25, 1); norm (4, 1, 2, 3) -> (1, 0, 1/3, 2/3)
    expected = [0.3 * r + 0.7 * n for r, n in zip([0, 0.5, 0.25, 1], [1, 0, 1 / 3, 2 / 3], strict=True)]
    score = get_head_criterion("jrnp", alpha=0.3).score(profile, 4, generator)
    assert score.tolist() == pytest.approx(expected)
    assert get_head_criterion("heads-rank").score(profile, 4, generator).tolist() == pytest.approx([0, 0.5, 0.25, 1])
    assert get_head_criterion("heads-norm").score(profile, 4, generator).tolist() == pytest.approx([1, 0, 1 / 3, 2 / 3])
    with pytest.raises(Exception, match="alpha"):
        get_head_criterion("jrnp", alpha=1.5)


def test_which_heads_go():
    plain = {0: LayerShape(0, 4, 4, 8, 8), 1: LayerShape(1, 4, 4, 8, 8)}
    scores = {0: torch.tensor([0.1, 0.9, 0.5, 0.7]), 1: torch.tensor([0.8, 0.2, 0.3, 0.4])}
    assert heads_to_remove(plain, scores, 0.5) == {0: [1, 3], 1: [0, 3]}
    assert heads_to_remove(plain, scores, 0.5, remove_lowest=True) == {0: [0, 2], 1: [1, 2]}
    assert heads_to_remove(plain, scores, 0.0) == {0: [], 1: []}
    grouped = {0: LayerShape(0, 2, 4, 8, 8)}  # value heads 0, 1 read key head 0; 2, 3 read key head 1
    assert heads_to_remove(grouped, {0: torch.tensor([0.9, 0.8, 0.7, 0.1])}, 0.5) == {0: [0, 2]}
    with pytest.raises(Exception, match="every head"):
        heads_to_remove(plain, scores, 0.9)
    with pytest.raises(Exception, match="less than one"):
        heads_to_remove(grouped, {0: torch.zeros(4)}, 0.2)
    with pytest.raises(Exception, match="ratio"):
        heads_to_remove(plain, scores, 1.0)


@pytest.mark.parametrize("model_type", ["delta_net", "gated_deltanet", "qwen3_next"])
@pytest.mark.parametrize("method", ["jrnp", "heads-random"])
def test_removed_heads_equal_masked_heads_and_reload(model_type, method, tokenizer, tmp_path):
    source = save_tiny(tmp_path / "source", model_type, tokenizer)
    ratio = 0.5
    report = api.prune(source, method, ratio, tmp_path / "out", data="techdocs", calib_tokens=256, seq_len=64,
                       progress=False)
    saved = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert saved["removed"] == report["removed"] and saved["state_bytes_after"] < saved["state_bytes_before"]

    # The original with the removed heads' outputs masked to zero (their out-projection columns) is the pruned model.
    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    adapter = adapter_for(reference)
    for layer, heads in report["removed"].items():
        shape, mixer = adapter.layer_shape(int(layer)), adapter.mixer(int(layer))
        out_proj = getattr(mixer, "o_proj", None) or mixer.out_proj  # fla / transformers names
        for head in heads:
            out_proj.weight.data[:, head * shape.head_v_dim : (head + 1) * shape.head_v_dim] = 0
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids()).logits, reference(ids()).logits, atol=1e-5, rtol=1e-5)

    # State bytes: the removed value heads' states and their conv channels are gone, and the cache holds that.
    pruned_adapter = api.load_model(tmp_path / "out").adapter
    assert report["state_bytes_after"] == pruned_adapter.state_bytes_per_seq()
    with torch.no_grad():
        cache = pruned_adapter.model(input_ids=ids()[:1], use_cache=True).past_key_values
    for layer in pruned_adapter.linear_layers():
        before, after = adapter.layer_shape(layer), pruned_adapter.layer_shape(layer)
        state = pruned_adapter.cached_state(cache, layer)  # [1, Hv, d_k, d_v]
        assert state.shape == (1, before.num_v_heads - len(report["removed"][str(layer)]), 8, 8)
        assert state.nbytes == after.num_v_heads * after.head_k_dim * after.head_v_dim * 4
    shape = pruned_adapter.shapes()[0]
    assert shape.num_v_heads == adapter.shapes()[0].num_v_heads // 2


def test_bad_input_writes_nothing(tokenizer, tmp_path, capsys):
    source = save_tiny(tmp_path / "source", "qwen3_next", tokenizer)  # 2 key heads x 2 value heads each
    out = tmp_path / "out"
    base = ["prune", str(source), "--out", str(out), "--data", "techdocs", "--calib-tokens", "128", "--seq-len", "64"]
    for extra, message in [
        (["--method", "jrnp", "--ratio", "1.2"], "ratio"),
        (["--method", "jrnp", "--ratio", "0.9"], "every head"),
        (["--method", "jrnp", "--ratio", "0.2"], "less than one"),
        (["--method", "jrnp", "--ratio", "0.5", "--scope", "global"], "global"),
        (["--method", "jrnp", "--ratio", "0.5", "--alpha", "2"], "alpha"),
    ]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()
    assert main(["prune", str(source), "--out", str(out), "--method", "jrnp", "--ratio", "0.5"]) == 2
    assert "--data" in capsys.readouterr().err


def test_global_scope_takes_the_best_heads_model_wide():
    shapes = {0: LayerShape(0, 3, 3, 8, 8), 1: LayerShape(1, 3, 3, 8, 8)}
    scores = {0: torch.tensor([0.9, 0.8, 0.7]), 1: torch.tensor([0.1, 0.2, 0.6])}
    # 4 of 6 heads: layer 0 may lose only 2 (one must stay), so the next best come from layer 1
    assert heads_to_remove_globally(shapes, scores, 0.66) == {0: [0, 1], 1: [1, 2]}
    grouped = {0: LayerShape(0, 2, 4, 8, 8)}
    with pytest.raises(Exception, match="group"):
        heads_to_remove_globally(grouped, {0: torch.zeros(4)}, 0.5)


@pytest.mark.parametrize("model_type", ["delta_net", "gated_deltanet"])
def test_global_scope_saves_a_model_that_auto_classes_load(model_type, tokenizer, tmp_path):
    config = tiny_config(model_type, len(tokenizer))
    if model_type == "gated_deltanet":
        config.num_heads, config.num_v_heads = 4, 4  # one value head per key head, as the global scope needs
    torch.manual_seed(0)
    source = tmp_path / "source"
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    report = api.prune(source, "heads-random", 0.5, tmp_path / "out", scope="global", seed=1, progress=False)
    counts = {layer: len(heads) for layer, heads in report["removed"].items()}
    assert sum(counts.values()) == round(0.5 * 12) and len(set(counts.values())) > 1 and max(counts.values()) < 4

    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == f"staterank_{model_type}"
    assert saved["staterank_layer_heads"] == {layer: [4 - n, 4 - n] for layer, n in counts.items()}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # registered by `import staterank`
    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    adapter = adapter_for(reference)
    for layer, heads in report["removed"].items():
        shape, mixer = adapter.layer_shape(int(layer)), adapter.mixer(int(layer))
        for head in heads:
            mixer.o_proj.weight.data[:, head * shape.head_v_dim : (head + 1) * shape.head_v_dim] = 0
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids()).logits, reference(ids()).logits, atol=1e-5, rtol=1e-5)
    assert [s.num_v_heads for s in adapter_for(reloaded).shapes()] == [4 - counts[str(i)] for i in range(3)]
    assert report["state_bytes_after"] == adapter_for(reloaded).state_bytes_per_seq()
