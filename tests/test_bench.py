"""staterank bench: side-by-side numbers, the JSON contract, random-weight configs, bad input."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from reference import tiny_config

from staterank import api
from staterank.cli import main
from staterank.loading import prepare_runtime

prepare_runtime("delta_net")


def test_bench_from_configs_side_by_side(tmp_path, capsys):
    small, large = tmp_path / "small.json", tmp_path / "large.json"
    config = tiny_config("delta_net", 64)
    large.write_text(json.dumps(config.to_dict()))
    config.expand_k = 0.5  # half the key dim: d_k 8 -> 4
    small.write_text(json.dumps(config.to_dict()))
    out = tmp_path / "bench.json"
    argv = ["bench", str(large), str(small), "--from-config", "--batch-size", "2", "--seq-len", "32",
            "--decode-batch-sizes", "1,2", "--decode-steps", "2", "--repeats", "2", "--memory-budget-gib", "0.01",
            "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and [m["name"] for m in result["models"]] == [str(large), str(small)]
    assert result["decode_graph_compiled"] is False  # graphed steps compiled only with --compile
    first, second = result["models"]
    # fp32 states [4 heads, d_k, 8] and conv caches (2 * 4 * d_k + 4 * 8 channels, 4 columns), 3 layers
    assert first["state_bytes_per_seq"] == 3 * (4 * 8 * 8 * 4 + (2 * 32 + 32) * 4 * 4)
    assert second["state_bytes_per_seq"] == 3 * (4 * 4 * 8 * 4 + (2 * 16 + 32) * 4 * 4)
    speedup = result["speedup"][str(small)]
    assert speedup["state_bytes"] == first["state_bytes_per_seq"] / second["state_bytes_per_seq"]
    for row in result["models"]:
        assert row["prefill_tokens_per_s"] > 0 and set(row["decode_ms_per_token"]) == {"1", "2"}
        assert row["max_batch_in_budget"] == (int(0.01 * 2**30) - row["weight_bytes"]) // row["state_bytes_per_seq"]
    assert "prefill tok/s" in capsys.readouterr().out


def test_bench_compile_refuses_a_model_whose_step_cannot_be_compiled(tmp_path, capsys):
    """fla's cache counts tokens in a Python int: ``--compile`` is refused in one line (exit 2), not dropped."""
    path = tmp_path / "deltanet.json"
    path.write_text(json.dumps(tiny_config("delta_net", 64).to_dict()))
    argv = ["bench", str(path), "--from-config", "--seq-len", "8", "--decode-batch-sizes", "1", "--decode-steps",
            "1", "--repeats", "1", "--compile", "--out", str(tmp_path / "bench.json")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "compile again" in err and "without --compile" in err and "\n" not in err
    assert not (tmp_path / "bench.json").exists()


def test_bench_refuses_different_vocabularies(tmp_path, capsys):
    paths = []
    for vocab in (64, 80):
        path = tmp_path / f"v{vocab}.json"
        path.write_text(json.dumps(tiny_config("delta_net", vocab).to_dict()))
        paths.append(str(path))
    assert main(["bench", *paths, "--from-config", "--seq-len", "8", "--repeats", "1"]) == 2
    assert "different vocabularies" in capsys.readouterr().err


def test_sequential_bench_loads_each_model_after_the_last_is_freed(tmp_path):
    import gc
    import weakref

    from staterank.bench import bench
    from staterank.loading import load

    alive: list[weakref.ref] = []

    def loader():
        assert all(ref() is None for ref in alive), "the previous model is still held"
        loaded = load("tiny-deltanet", device="cpu", dtype=torch.float32)
        alive.append(weakref.ref(loaded.model))
        return loaded

    gc.collect()
    result = bench([loader, loader], ["a", "b"], batch_size=1, seq_len=16, decode_batch_sizes=(1,), decode_steps=2,
                   warmup=0, repeats=1, sequential=True)  # fmt: skip
    gc.collect()
    assert len(alive) == 2 and alive[0]() is None
    assert result["interleaved"] is False and [row["name"] for row in result["models"]] == ["a", "b"]
    assert result["models"][0]["state_bytes_per_seq"] == result["models"][1]["state_bytes_per_seq"]
    assert result["speedup"]["b"]["state_bytes"] == 1.0


def test_sequential_bench_keeps_the_models_measured_when_a_later_one_fails(tmp_path, capsys):
    """One model at a time: after each model but the last, the result so far is in OUT's .partial file; a run
    that fails at a later model keeps it and says where, and a run that completes leaves only OUT."""
    paths = []
    for name, vocab in (("a", 64), ("b", 64), ("c", 80)):  # c's vocabulary cannot share a's inputs
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(tiny_config("delta_net", vocab).to_dict()))
    out, partial = tmp_path / "bench.json", tmp_path / "bench.partial.json"
    argv = ["bench", "--from-config", "--sequential", "--seq-len", "8", "--batch-size", "1",
            "--decode-batch-sizes", "1", "--decode-steps", "1", "--warmup", "0", "--repeats", "1", "--out", str(out)]
    assert main([*argv[:1], *map(str, paths), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert "different vocabularies" in err and str(partial) in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    kept = json.loads(partial.read_text())
    assert [row["name"] for row in kept["models"]] == [str(p) for p in paths[:2]]
    assert kept["models_pending"] == [str(paths[2])] and kept["interleaved"] is False
    assert main([*argv[:1], *map(str, paths[:2]), *argv[1:]]) == 2  # the partial file is an output too
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv[:1], *map(str, paths[:2]), *argv[1:], "--overwrite"]) == 0
    assert not partial.exists() and [row["name"] for row in json.loads(out.read_text())["models"]] == list(
        map(str, paths[:2])
    )


def test_sequential_bench_reports_each_model_as_it_is_measured():
    from staterank.bench import bench
    from staterank.loading import load

    seen = []
    loader = functools.partial(load, "tiny-deltanet", device="cpu", dtype=torch.float32)
    keep = lambda r: seen.append(json.loads(json.dumps(r)))  # noqa: E731  (a copy: JSON as it would be written)
    result = bench([loader] * 3, ["a", "b", "c"], batch_size=1, seq_len=8, decode_batch_sizes=(1,), decode_steps=1,
                   warmup=0, repeats=1, sequential=True, on_measured=keep)  # fmt: skip
    assert [[row["name"] for row in r["models"]] for r in seen] == [["a"], ["a", "b"]]
    assert [r["models_pending"] for r in seen] == [["b", "c"], ["c"]]
    final = json.loads(json.dumps(result))
    assert "models_pending" not in final and seen[1]["models"] == final["models"][:2]
    assert seen[1]["speedup"]["b"] == final["speedup"]["b"]


def test_bench_api_on_a_loaded_model_directory(tmp_path):
    torch.manual_seed(0)
    result = api.bench(["tiny-deltanet"], batch_size=1, seq_len=16, decode_batch_sizes=(1,), decode_steps=2,
                       repeats=1, warmup=0)
    assert result["models"][0]["state_bytes_per_seq"] == api.info("tiny-deltanet")["state_bytes_per_seq"]
    assert result["speedup"] == {}


def test_decode_bound_counts_weights_once_and_state_twice():
    from transformers import AutoModelForCausalLM

    from staterank.bench import decode_bytes_per_step

    config = tiny_config("delta_net", 64)
    for tied in (True, False):
        config.tie_word_embeddings = tied
        model = AutoModelForCausalLM.from_config(config)
        embedding = model.get_input_embeddings().weight
        all_bytes = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
        unread = 0 if tied else (64 - 3) * embedding.shape[1] * 4  # only 3 rows of an untied input embedding
        assert decode_bytes_per_step(model, 1000, 3) == all_bytes - unread + 2 * 3 * 1000


def test_the_routed_estimate_counts_the_experts_a_batch_reads():
    """Qwen3-Next with 8 experts of which 2 per token: the fused expert weights of every MoE layer are counted
    from the config by hand; at batch 1 a step reads 2 of 8, at batch B a fraction 1 - (3/4)^B, and shared experts
    are read whole. A dense model has no estimate."""
    from transformers import AutoModelForCausalLM, Qwen3NextConfig

    from staterank.bench import decode_bytes_per_step, routed_decode_bytes_per_step, routed_experts

    prepare_runtime("qwen3_next")
    config = Qwen3NextConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_key_head_dim=8,
                             linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                             layer_types=["linear_attention", "full_attention"], num_experts=8, num_experts_per_tok=2,
                             moe_intermediate_size=16, shared_expert_intermediate_size=16)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    experts = 2 * 8 * 3 * 32 * 16 * 4  # layers x experts x (gate, up, down) x hidden x intermediate x float32
    assert routed_experts(model) == (experts, 8, 2)
    full = decode_bytes_per_step(model, 100, 1)
    assert routed_decode_bytes_per_step(model, 100, 1) == full - experts * 6 // 8
    full = decode_bytes_per_step(model, 100, 5)
    assert routed_decode_bytes_per_step(model, 100, 5) == full - round(experts * 0.75**5)
    assert routed_decode_bytes_per_step(AutoModelForCausalLM.from_config(tiny_config("delta_net", 64)), 100, 1) is None


def test_bench_says_which_decode_batch_fits_the_budget(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_config("delta_net", 64).to_dict()))
    argv = ["bench", str(path), "--from-config", "--seq-len", "8", "--repeats", "1", "--decode-batch-sizes", "1,100000",
            "--memory-budget-gib", "0.01"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "decode batch 100000 does not fit" in err and "the largest batch" in err and len(err.splitlines()) == 1


def test_static_decoder_refuses_a_growing_cache():
    """A hybrid's DynamicCache grows in its attention layers: no fixed-size step to capture in it."""
    from transformers import AutoModelForCausalLM

    from staterank.models import StaticCacheError, adapter_for

    prepare_runtime("qwen3_next")
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_next", 64)).eval()
    with torch.no_grad():
        cache = model(input_ids=torch.randint(0, 64, (1, 5)), use_cache=True).past_key_values
    with pytest.raises(StaticCacheError, match="grows with every token"):
        adapter_for(model).static_cache_tensors(cache)


def test_static_decoder_stops_at_its_capacity():
    from transformers import AutoModelForCausalLM

    from staterank.bench import BenchError, StaticDecoder

    prepare_runtime("qwen3_5_text")
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_5_text", 64)).eval()
    decoder = StaticDecoder(model, torch.randint(0, 64, (1, 5)), max_new_tokens=2)
    decoder.step()
    decoder.step()
    with pytest.raises(BenchError, match="holds 2 new tokens"):
        decoder.step()
