"""Check staterank's PyTorch backend against flash-linear-attention's Triton kernels (needs a CUDA GPU).

The same randomly initialised model of every family with a linear-attention kernel of its own (fla's
DeltaNet, Gated DeltaNet, KDA and Gated DeltaProduct; transformers' Kimi Linear and OLMo Hybrid, which
call fla's KDA and gated-delta-rule kernels on the GPU), and the bundled models when given, run once on
the GPU, where fla's Triton kernels compute them in bfloat16 (fla's chunk kernels refuse float32), and
once on the CPU, where staterank's backend computes them in float32, with the same (bf16-rounded)
weights. Reports the largest and the relative logit difference, the relative difference of the cached
recurrent states (read through each family's adapter), and of the gradients w.r.t. the weights; and, on the
GPU, decoding with the states written in place against decoding through the model's own cache.

    python benchmarks/backend_vs_triton.py [--families kda kimi_linear ...] [--models tiny-deltanet] [--out FILE]
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys

import torch

from staterank.models import adapter_for


def compare(name: str, model, vocab_size: int, batch: int, seq_len: int, backward: bool) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    runs = {}
    model.to(torch.bfloat16)  # round the weights once: both runs see the same values
    for device, dtype in (("cuda", torch.bfloat16), ("cpu", torch.float32)):
        # train mode with gradients: the chunk kernels, as in training; eval: as in prefill
        model.to(device, dtype).train(backward)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            out = model(input_ids=ids.to(device), use_cache=True)
        logits = out.logits.float()
        # the loss from the logits here: fla's fused criterion overwrites its logits with gradients on the GPU
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten().to(device))
        adapter = adapter_for(model)
        cache = out.past_key_values
        states = [adapter.cached_state(cache, layer).detach().float().cpu() for layer in adapter.linear_layers()]
        grads = None
        if backward:
            try:
                loss.backward()
                grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
            except Exception as e:  # fla refuses some backward kernels on some GPU / Triton pairs: report, go on
                grads = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        runs[device] = (logits.detach().cpu(), loss.item(), states, grads)
    gpu_logits, gpu_loss, gpu_states, gpu_grads = runs["cuda"]
    cpu_logits, cpu_loss, cpu_states, cpu_grads = runs["cpu"]
    if gpu_grads is None or isinstance(gpu_grads, str):
        relative_grad = None
    else:
        relative_grad = max(
            ((gpu_grads[n] - cpu_grads[n]).norm() / gpu_grads[n].norm().clamp_min(1e-12)).item() for n in gpu_grads
        )
    return {
        "model": name,
        "batch": batch,
        "seq_len": seq_len,
        "max_abs_logit_diff": (gpu_logits - cpu_logits).abs().max().item(),
        "max_abs_logit": cpu_logits.abs().max().item(),
        "relative_logit_diff": ((gpu_logits - cpu_logits).norm() / cpu_logits.norm()).item(),
        "loss_gpu": gpu_loss,
        "loss_cpu": cpu_loss,
        "max_relative_state_diff": max(
            ((a - b).norm() / b.norm()).item() for a, b in zip(gpu_states, cpu_states, strict=True)
        ),
        "max_relative_grad_diff": relative_grad,
        "gpu_backward_error": gpu_grads if isinstance(gpu_grads, str) else None,
    }


def conv_check(batch: int = 4, channels: int = 8192, seq_len: int = 1000, width: int = 4) -> dict:
    """fla's Triton causal convolution, as staterank routes transformers' GPU calls to it, against transformers'
    PyTorch reference, in float32 on the GPU: the whole-sequence form, then ten single-token updates of the state."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen

    from staterank.backends.hf_fallbacks import fla_causal_conv1d_fn, fla_causal_conv1d_update

    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, channels, seq_len, device="cuda", generator=generator)
    weight = torch.randn(channels, width, device="cuda", generator=generator) / width
    bias = torch.randn(channels, device="cuda", generator=generator)
    reference_fn, reference_update = (
        inspect.unwrap(qwen.causal_conv1d_fn), inspect.unwrap(qwen.causal_conv1d_update)
    )  # fmt: skip
    expected = reference_fn(x, weight, bias, activation="silu")
    fn_diff = (fla_causal_conv1d_fn(x, weight, bias, activation="silu") - expected).abs().max().item()
    state_ref, state_fla = x[..., -width:].clone(), x[..., -width:].clone()
    update_diff = state_diff = 0.0
    for _ in range(10):
        token = torch.randn(batch, channels, 1, device="cuda", generator=generator)
        y_ref = reference_update(token, state_ref, weight, bias, activation="silu")
        y_fla = fla_causal_conv1d_update(token, state_fla, weight, bias, activation="silu")
        update_diff = max(update_diff, (y_fla - y_ref).abs().max().item())
        state_diff = max(state_diff, (state_fla - state_ref).abs().max().item())
    return {"shape": [batch, channels, seq_len, width], "max_abs_diff_fn": fn_diff,
            "max_abs_diff_update": update_diff, "max_abs_diff_state": state_diff}  # fmt: skip


@torch.no_grad()
def decode_in_place_check(
    name: str, model, vocab_size: int, batch: int = 4, prompt_len: int = 40, steps: int = 6, compile: bool = False,
    graph: bool = False,
) -> dict:
    """Decoding with the states written in place (:class:`staterank.bench.StaticDecoder`, through fla's KDA kernel
    with ``inplace_final_state``) against decoding through the model's own cache (fla's kernels returning new
    states), in bfloat16 on the GPU: logits at every step, and how many states the decoder still had to copy.
    With ``graph``, the decoder checked is what ``staterank bench`` replays: the step captured in a CUDA graph
    (:class:`staterank.bench.GraphedDecoder`), after its warm-up steps, which the model's own cache decodes too;
    with ``compile``, the step is compiled by torch.compile first (``bench --compile``)."""
    from staterank.bench import GraphedDecoder, StaticDecoder

    model.to("cuda", torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab_size, (batch, prompt_len), generator=generator).cuda()
    warm = 3 if graph else 0  # the graphed decoder's warm-up steps, each the prompt's last token again
    if graph:
        decoder = GraphedDecoder(model, prompt, steps + warm + 1, warmup_steps=warm, relayout=False, compile=compile)
    else:
        decoder = StaticDecoder(model, prompt, max_new_tokens=steps, compile=compile)
    cache = model(input_ids=prompt, use_cache=True).past_key_values
    for _ in range(warm):
        cache = model(input_ids=prompt[:, -1:], past_key_values=cache, use_cache=True).past_key_values
    worst = relative = 0.0
    copies = []
    for _ in range(steps):
        expected = model(input_ids=prompt[:, -1:], past_key_values=cache, use_cache=True)
        cache = expected.past_key_values
        got = decoder.step().float()
        copies.append(decoder.copies)
        want = expected.logits.float()
        worst = max(worst, (got - want).abs().max().item())
        relative = max(relative, ((got - want).norm() / want.norm()).item())
    return {"model": name, "batch": batch, "prompt_len": prompt_len, "steps": steps, "graphed": graph,
            "compiled": compile, "max_abs_logit_diff": worst, "relative_logit_diff": relative,
            "state_copies_per_step": max(copies)}  # fmt: skip


def random_configs() -> dict:
    """One small random config per family (hidden 512, 4 layers, d_k 128), keyed by 'model_type, description'."""
    from fla.models import DeltaNetConfig, GatedDeltaNetConfig, GatedDeltaProductConfig, KDAConfig
    from transformers import KimiLinearConfig, OlmoHybridConfig, Qwen3_5TextConfig

    small = dict(hidden_size=512, num_hidden_layers=4, vocab_size=4096)
    hybrid_layers = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
    return {
        "delta_net, h512, 4 layers, 8 heads": lambda: DeltaNetConfig(**small, num_heads=8, use_gate=True),
        "gated_deltanet, h512, 4 layers, 2k x 4v heads": lambda: GatedDeltaNetConfig(
            **small, num_heads=2, num_v_heads=4, head_dim=128, expand_v=1.0
        ),
        "kda, h512, 4 layers, 2k x 4v heads": lambda: KDAConfig(
            **small, num_heads=2, num_v_heads=4, head_dim=128, expand_v=1.0
        ),
        "gated_deltaproduct, h512, 4 layers, 4 heads, 2 Householder steps, negative eigenvalues": lambda: (
            GatedDeltaProductConfig(
                **small, num_heads=4, head_dim=128, expand_v=1.0, num_householder=2, use_forget_gate=True,
                allow_neg_eigval=True,
            )
        ),
        "kimi_linear, h512, 3 KDA + 1 MLA, 4 heads, MoE 8 experts": lambda: KimiLinearConfig(
            **small, intermediate_size=1024, moe_intermediate_size=256, num_experts=8, num_experts_per_token=2,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=128, qk_rope_head_dim=32,
            qk_nope_head_dim=64, v_head_dim=64, linear_head_dim=128, linear_num_heads=4, layer_types=hybrid_layers,
            pad_token_id=None, bos_token_id=None, eos_token_id=None,
        ),
        "olmo_hybrid, h512, 3 GDN + 1 attention, 2k x 4v heads, d_v 2 d_k": lambda: OlmoHybridConfig(
            **small, intermediate_size=1024, num_attention_heads=4, linear_num_key_heads=2,
            linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=128, linear_conv_kernel_dim=4,
            linear_allow_neg_eigval=True, pad_token_id=0, eos_token_id=1, layer_types=hybrid_layers,
        ),
        "qwen3_5_text, h512, 3 GDN + 1 attention, 2k x 4v heads": lambda: Qwen3_5TextConfig(
            **small, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=128, linear_value_head_dim=128,
            layer_types=hybrid_layers,
        ),
    }  # fmt: skip


def main() -> int:
    families = ["delta_net", "gated_deltanet", "kda", "gated_deltaproduct", "kimi_linear", "olmo_hybrid",
                "qwen3_5_text"]  # fmt: skip
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=families, choices=families, help="random models to check")
    parser.add_argument("--models", nargs="*", default=[], help="model directories or bundled names to check too")
    parser.add_argument("--seq-len", type=int, default=1000, help="not a multiple of the chunk size on purpose")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backward", action="store_true", help="also compare gradients (compiles more kernels)")
    parser.add_argument("--decode-only", action="store_true", help="only the in-place decoding check")
    parser.add_argument(
        "--decoders", default="static",
        help="comma-separated decoders to check: static, graph, compiled, compiled-graph (compiled: hybrids only)",
    )  # fmt: skip
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2

    from staterank.loading import load, prepare_runtime

    prepare_runtime("delta_net")
    from transformers import AutoModelForCausalLM

    configs = {name: build for name, build in random_configs().items() if name.split(",")[0] in args.families}
    conv = None if args.decode_only else conv_check()
    print(json.dumps({"causal_conv1d": conv}), flush=True)
    results, decoding = [], []
    for name, build in configs.items():
        torch.manual_seed(0)
        config = build()
        model = AutoModelForCausalLM.from_config(config)
        for decoder in args.decoders.split(","):
            graph, compile = decoder.endswith("graph"), decoder.startswith("compiled")
            decoding.append(decode_in_place_check(name, model, config.vocab_size, compile=compile, graph=graph))
            print(json.dumps(decoding[-1]), flush=True)
        if args.decode_only:
            continue
        results.append(compare(name, model, config.vocab_size, args.batch, args.seq_len, args.backward))
        print(json.dumps(results[-1]), flush=True)
    for path in args.models:
        loaded = load(path, device="cpu", dtype=torch.float32)
        results.append(
            compare(path, loaded.model, loaded.model.config.vocab_size, args.batch, args.seq_len, args.backward)
        )
        print(json.dumps(results[-1]), flush=True)

    print(
        f"\n{'model':<60} {'max |dlogit|':>12} {'max |logit|':>11} "
        f"{'rel dlogit':>10} {'rel dstate':>10} {'rel dgrad':>10}"
    )
    for r in results:
        print(
            f"{r['model'][:60]:<60} {r['max_abs_logit_diff']:>12.2e} {r['max_abs_logit']:>11.2f} "
            f"{r['relative_logit_diff']:>10.2e} {r['max_relative_state_diff']:>10.2e} "
            f"{'n/a' if r['max_relative_grad_diff'] is None else format(r['max_relative_grad_diff'], '.2e'):>10}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "causal_conv1d": conv, "results": results,
                 "decode_in_place": decoding}, f, indent=2,
            )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
