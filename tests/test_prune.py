"""staterank prune (Q/K channels): the driver, calibration statistics, saved models, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from reference import tiny_config
from transformers import AutoModelForCausalLM

from staterank import api
from staterank.calibrate import calibrate
from staterank.cli import main
from staterank.data import read_documents
from staterank.loading import prepare_runtime
from staterank.models import adapter_for
from staterank.prune.channels import CHANNEL_CRITERIA
from staterank.prune.qk import kept_dim
from staterank.tokenizer import train_tokenizer

prepare_runtime("delta_net")
from fla.models import DeltaNetConfig, GatedDeltaNetConfig  # noqa: E402


def save_tiny(path, config, tokenizer) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    # Weights large enough that every channel matters.
    for name, param in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            torch.nn.init.normal_(param, std=0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((doc[:3000] for doc in read_documents("techdocs-val")), vocab_size=300)


@pytest.fixture(scope="module")
def deltanet_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("deltanet")
    # Pruning changes the kernel's query scale from d_k^-1/2 to d_k'^-1/2; the per-head output RMSNorm right
    # after cancels that factor up to its epsilon, which a tiny random model's small outputs would feel.
    config = DeltaNetConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=len(tokenizer), norm_eps=1e-30)
    save_tiny(path, config, tokenizer)
    return path


@pytest.fixture(scope="module")
def gated_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("gdn")
    config = GatedDeltaNetConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, num_v_heads=4, head_dim=16,
                                 expand_v=1.0, vocab_size=len(tokenizer))
    save_tiny(path, config, tokenizer)
    return path


def ids(n: int = 2, length: int = 40) -> torch.Tensor:
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(3))


def test_kept_dim_and_alignment():
    assert kept_dim(128, 0.5) == 64
    assert kept_dim(128, 0.3, align=1) == 89  # floor(89.6)
    assert kept_dim(128, 0.3, align=16) == 80
    # The default rounds down to 16, else 8, only where that drops at most 5% of d_k beyond the floor:
    assert kept_dim(128, 0.6) == 48  # floor(51.2) = 51 -> 48 costs 3 channels (2.3% of 128)
    assert kept_dim(128, 0.3) == 88  # 89 -> 80 would cost 9 (7%); 89 -> 88 costs 1
    assert kept_dim(64, 0.6) == 24  # 25 -> 16 would remove 75% where 60% was asked; 25 -> 24
    assert kept_dim(16, 0.25) == 12  # 12 -> 8 would cost 4 of 16: unaligned
    assert kept_dim(100, 0.0) == 100  # ratio 0 keeps every channel, aligned or not
    assert kept_dim(16, 0.5) == 8
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(Exception, match="ratio"):
            kept_dim(128, ratio)
    with pytest.raises(Exception, match="leaves no"):
        kept_dim(128, 0.9, align=16)


@pytest.mark.parametrize("method", sorted(CHANNEL_CRITERIA))
def test_every_method_prunes_saves_and_reloads(method, gated_dir, tmp_path):
    out = tmp_path / "pruned"
    report = api.prune(gated_dir, method, 0.5, out, data="techdocs", calib_tokens=512, seq_len=64, seed=1,
                       progress=False)
    saved = json.loads((out / "pruning.json").read_text())
    assert saved == json.loads(json.dumps(report))
    reads_data = CHANNEL_CRITERIA[method].needs or CHANNEL_CRITERIA[method].trains
    assert saved["head_k_dim_after"] == 8 and saved["calib_tokens"] == (512 if reads_data else 0)
    assert set(saved["kept"]) == {"0", "1"} and all(len(head) == 8 for head in saved["kept"]["0"].values())
    # state: 4 heads x (16 -> 8) x 16 fp32 and conv channels 2 x 2 x (16 -> 8) fewer, per layer
    assert saved["state_bytes_before"] - saved["state_bytes_after"] == 2 * (4 * 8 * 16 * 4 + 2 * 2 * 8 * 4 * 4)

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.head_dim == 8
    loaded = api.load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids()).logits, loaded.model(ids()).logits)


def test_ratio_zero_is_the_identity(deltanet_dir, tmp_path):
    api.prune(deltanet_dir, "rrqr", 0.0, tmp_path / "same", data="techdocs", calib_tokens=256, seq_len=64,
              progress=False)
    before, after = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (deltanet_dir, tmp_path / "same"))
    with torch.no_grad():
        torch.testing.assert_close(after(ids()).logits, before(ids()).logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["rrqr", "wanda", "taylor", "l1"])
def test_channels_dead_in_the_calibration_data_go_first(method, deltanet_dir, tmp_path):
    """A channel whose q and k rows are zero is zero in every feature: removing it leaves the logits unchanged."""
    dead = tmp_path / "dead"
    model = AutoModelForCausalLM.from_pretrained(deltanet_dir)
    adapter = adapter_for(model)
    for layer in adapter.linear_layers():
        for rows in adapter.qk_weights(layer):  # [Hk, d_k, hidden]
            rows[:, 3:].zero_()  # channels 3.. of every head are dead; keep 3 of 16
    model.save_pretrained(dead)
    api.load_model(deltanet_dir).tokenizer.save_pretrained(dead)
    out = tmp_path / "pruned"
    report = api.prune(dead, method, 1 - 3 / 16, out, data="techdocs", calib_tokens=256, seq_len=64, progress=False)
    assert all(channels == [0, 1, 2] for layer in report["kept"].values() for channels in layer.values())
    pruned = AutoModelForCausalLM.from_pretrained(out).double().eval()  # float64: head outputs can be tiny
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids()).logits, model.double().eval()(ids()).logits, atol=1e-9, rtol=1e-9)


def test_calibration_memory_does_not_grow_with_tokens(deltanet_dir):
    """The statistics are running sums: their sizes depend on the model only; the Gram equals a direct sum."""
    loaded = api.load_model(deltanet_dir)
    sequences = torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(0))
    small = calibrate(loaded.adapter, sequences[:2], batch_size=2, progress=False)
    large = calibrate(loaded.adapter, sequences, batch_size=2, progress=False)
    for layer in loaded.adapter.linear_layers():
        assert small[layer].gram_q.shape == large[layer].gram_q.shape == (2, 16, 16)
        assert large[layer].tokens == 6 * 32

    features = {}
    with torch.no_grad(), loaded.adapter.tap(lambda f: features.setdefault(f.layer, []).append(f.k)):
        for start in range(0, 6, 3):
            loaded.model(input_ids=sequences[start : start + 3])
    for layer, ks in features.items():
        k = torch.cat(ks).double()  # [6, 32, Hk, d_k]
        expected = sum(k[b, t, :, :, None] * k[b, t, :, None, :] for b in range(6) for t in range(32))
        torch.testing.assert_close(large[layer].gram_k, expected)


def test_taylor_statistics_equal_a_direct_gradient(deltanet_dir):
    loaded = api.load_model(deltanet_dir)
    batch = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    stats = calibrate(loaded.adapter, batch, batch_size=2, gradients=True, progress=False)
    model = AutoModelForCausalLM.from_pretrained(deltanet_dir)
    loss = torch.nn.functional.cross_entropy(model(batch).logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    for layer in (0, 1):
        weight = model.model.layers[layer].attn.q_proj.weight
        expected = (weight * weight.grad).abs().sum(-1).view(2, 16).double()
        torch.testing.assert_close(stats[layer].taylor_q, expected, rtol=1e-4, atol=1e-8)


def test_bad_input_writes_nothing(deltanet_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["prune", str(deltanet_dir), "--out", str(out), "--seq-len", "64", "--calib-tokens", "256"]
    for extra, message in [
        (["--method", "rrqr", "--ratio", "1.0", "--data", "techdocs"], "ratio"),
        (["--method", "rrqr", "--ratio", "0.95", "--data", "techdocs", "--align", "8"], "leaves no"),
        (["--method", "rrqr", "--ratio", "0.5"], "--data"),
        (["--method", "magic", "--ratio", "0.5"], "rrqr"),
        (["--method", "rrqr", "--ratio", "0.5", "--data", "techdocs", "--option", "nope=1"], "nope"),
    ]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert not out.exists() and not list(tmp_path.glob(".out*"))
    out.mkdir()
    assert main(base + ["--method", "l1", "--ratio", "0.5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(base + ["--method", "l1", "--ratio", "0.5", "--overwrite"]) == 0
    assert (out / "pruning.json").exists()


def test_a_ratio_the_alignment_changes_says_requested_and_actual(tmp_path, capsys):
    """tiny-deltanet has d_k 64: ratio 0.6 asks for floor(25.6) = 25 channels, the default alignment keeps 24."""
    out = tmp_path / "out"
    assert main(["prune", "tiny-deltanet", "--method", "l1", "--ratio", "0.6", "--out", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "d_k 64 -> 24 per head (floor(d_k (1 - ratio)) = 25, aligned to 8)" in line
    assert "requested ratio 0.6, actual 0.625" in line
    saved = json.loads((out / "pruning.json").read_text())
    assert (saved["ratio"], saved["kept_ratio"], saved["align"], saved["unit"]) == (0.6, 1 - 24 / 64, 8, "channel")
    assert AutoModelForCausalLM.from_pretrained(out).model.layers[0].attn.q_proj.out_features == 4 * 24  # 4 heads
    assert all(len(channels) == 24 for layer in saved["kept"].values() for channels in layer.values())
    assert main(["prune", "tiny-deltanet", "--method", "l1", "--ratio", "0.5", "--out", str(out), "--overwrite"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "d_k 64 -> 32 per head," in line and "requested" not in line  # exact: nothing to say
    assert json.loads((out / "pruning.json").read_text())["kept_ratio"] == 0.5


def test_nan_features_name_the_layer_and_head(deltanet_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(deltanet_dir)
    adapter_for(model).qk_weights(1)[1][1, 0, 0] = float("nan")  # k row of head 1, layer 1
    model.save_pretrained(broken)
    api.load_model(deltanet_dir).tokenizer.save_pretrained(broken)
    argv = ["prune", str(broken), "--method", "rrqr", "--ratio", "0.5", "--data", "techdocs", "--out",
            str(tmp_path / "o"), "--seq-len", "64", "--calib-tokens", "128"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "layer 1, head(s) [1]" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_text"])
def test_transformers_hybrids_prune_and_reload(model_type, tokenizer, tmp_path):
    """Only the linear-attention layers change; the saved model reloads through stock transformers."""
    source = tmp_path / "source"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(model_type, len(tokenizer))).save_pretrained(source)
    tokenizer.save_pretrained(source)
    report = api.prune(source, "rrqr", 0.5, tmp_path / "out", data="techdocs", calib_tokens=256, seq_len=64,
                       progress=False)
    assert set(report["kept"]) == {"0", "1"} and report["head_k_dim_after"] == 4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.linear_key_head_dim == 4
    assert reloaded.model.layers[2].self_attn.q_proj.weight.shape == (2 * 16 * 2, 32)  # full attention untouched
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids()).logits, api.load_model(tmp_path / "out").model(ids()).logits)
