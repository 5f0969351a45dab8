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
    assert heads_to_remove(plain, scores, 0.5) == ({0: [1, 3], 1: [0, 3]}, "head")
    assert heads_to_remove(plain, scores, 0.5, remove_lowest=True) == ({0: [0, 2], 1: [1, 2]}, "head")
    assert heads_to_remove(plain, scores, 0.0)[0] == {0: [], 1: []}
    assert heads_to_remove(plain, scores, 0.3)[0] == {0: [1], 1: [0]}  # 1 of 4 = 0.25, within a quarter of 0.3
    grouped = {0: LayerShape(0, 2, 4, 8, 8)}  # value heads 0, 1 read key head 0; 2, 3 read key head 1
    assert heads_to_remove(grouped, {0: torch.tensor([0.9, 0.8, 0.7, 0.1])}, 0.5) == ({0: [0, 2]}, "value_head")
    with pytest.raises(Exception, match="every head"):
        heads_to_remove(plain, scores, 0.9)  # 4 of 4
    with pytest.raises(Exception, match="ratios that work are 0.25, 0.5, 0.75"):
        heads_to_remove(plain, scores, 0.1)  # the nearest count is 0: nothing would go
    with pytest.raises(Exception, match="cannot be honoured"):
        heads_to_remove(grouped, {0: torch.zeros(4)}, 0.2)
    with pytest.raises(Exception, match="ratio"):
        heads_to_remove(plain, scores, 1.0)


def test_the_tolerance_and_the_global_hint():
    plain = {0: LayerShape(0, 4, 4, 8, 8), 1: LayerShape(1, 4, 4, 8, 8)}
    scores = {0: torch.zeros(4), 1: torch.zeros(4)}
    assert heads_to_remove(plain, scores, 0.45)[0] == {0: [0, 1], 1: [0, 1]}  # 0.5: 11% off
    with pytest.raises(Exception, match="0.25, 0.5, 0.75") as refused:
        heads_to_remove(plain, scores, 0.375)  # nearest 2 of 4 = 0.5 (33% off) or 1 of 4 = 0.25 (33% off)
    assert "--scope global ranks all 8 heads" in str(refused.value)  # 3 of 8 = 0.375 exactly
    two = {layer: LayerShape(layer, 2, 2, 8, 8) for layer in range(4)}  # tiny-gated-deltanet's layout
    with pytest.raises(Exception, match="layer 0 has 2 heads, so per layer the ratios that work are 0.5; --scope"):
        heads_to_remove(two, {layer: torch.zeros(2) for layer in two}, 0.25)
    assert sum(map(len, heads_to_remove_globally(two, {layer: torch.zeros(2) for layer in two}, 0.25).values())) == 2
    with pytest.raises(Exception, match="the model has 8 heads"):
        heads_to_remove_globally(two, {layer: torch.zeros(2) for layer in two}, 0.05)  # nearest count 0


def test_whole_key_heads_go_where_value_heads_cannot():
    """16 key heads x 2 value heads (Qwen3-Next): 25% is 0.5 value head per key head, but 4 whole key heads."""
    shape = LayerShape(0, 16, 32, 8, 8)
    scores = torch.rand(32, generator=torch.Generator().manual_seed(0))
    removed, unit = heads_to_remove({0: shape}, {0: scores}, 0.25)
    assert unit == "key_head" and len(removed[0]) == 8
    # Independently: the mean score of each key head's two value heads, the four highest go with both value heads.
    means = [(scores[2 * key] + scores[2 * key + 1]) / 2 for key in range(16)]
    keys = sorted(range(16), key=lambda key: -means[key])[:4]
    assert removed[0] == sorted(h for key in keys for h in (2 * key, 2 * key + 1))
    assert heads_to_remove({0: shape}, {0: scores}, 0.5)[1] == "value_head"  # both exact: the finer unit
    assert heads_to_remove({0: shape}, {0: scores}, 0.5, unit="key")[1] == "key_head"
    with pytest.raises(Exception, match="value heads of every key head"):
        heads_to_remove({0: shape}, {0: scores}, 0.25, unit="value")


@pytest.mark.parametrize(
    ("model_type", "unit"),
    [("delta_net", "auto"), ("gated_deltanet", "auto"), ("qwen3_next", "auto"), ("gated_deltanet", "key"),
     ("qwen3_next", "key")],
)
@pytest.mark.parametrize("method", ["jrnp", "heads-random"])
def test_removed_heads_equal_masked_heads_and_reload(model_type, unit, method, tokenizer, tmp_path):
    source = save_tiny(tmp_path / "source", model_type, tokenizer)
    ratio = 0.5
    report = api.prune(source, method, ratio, tmp_path / "out", data="techdocs", calib_tokens=256, seq_len=64,
                       unit=unit, progress=False)
    saved = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert saved["removed"] == report["removed"] and saved["state_bytes_after"] < saved["state_bytes_before"]
    assert saved["kept_ratio"] == 0.5 and saved["ratio"] == 0.5
    grouped = model_type != "delta_net"
    assert saved["unit"] == {"auto": "value_head" if grouped else "head", "key": "key_head"}[unit]
    if unit == "key":  # one of the two key heads goes with both its value heads: the one with the higher mean
        for layer, scores in saved["scores"].items():
            first, second = sum(scores[:2]), sum(scores[2:])  # key head 0 serves value heads 0, 1; key head 1: 2, 3
            higher = [0, 1] if first > second else [2, 3]
            assert first == second or saved["removed"][layer] == higher

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
        (["--method", "jrnp", "--ratio", "0.2"], "cannot be honoured"),
        (["--method", "jrnp", "--ratio", "0.5", "--unit", "key", "--scope", "global"], "--unit"),
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
