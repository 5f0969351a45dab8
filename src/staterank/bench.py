"""Side-by-side speed and memory of models: prefill throughput, decode time per token, state bytes.

All models run in one process on the same inputs; repeats are interleaved (model A, model B, A, B,
...) so drifting clocks and caches hit every model alike; medians and spreads are reported with the
ratios to the first model. Models too large to share the device are measured one after another
(``sequential``), each loaded and freed in turn.

Decoding is timed twice. Eager: one forward per generated token through the model's cache; on a GPU
this is launch-bound (thousands of small kernels per token), which hides the effect of a smaller
state. Graphed (CUDA only): one decoding step is captured once in a CUDA graph over a cache whose
state tensors never move (:class:`StaticDecoder`) and replayed, which removes the launch overhead.
Both are set against the memory-bandwidth bound of a step: the bytes of weights read plus the state
read and written, over the device's measured copy bandwidth.
"""

from __future__ import annotations

import gc
import inspect
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from staterank.backends.in_place import states_in_place
from staterank.errors import StaterankError
from staterank.loading import LoadedModel
from staterank.models import StaticCacheError, adapter_for


class BenchError(StaterankError):
    """Models or options that cannot be benchmarked side by side."""


@dataclass
class Timing:
    median: float
    spread: float  # (max - min) / median over the repeats

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        median = statistics.median(samples)
        return cls(median, (max(samples) - min(samples)) / median if median > 0 else 0.0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def _prefill(model, ids: torch.Tensor) -> None:
    model(input_ids=ids, use_cache=False)


def cache_of(output):
    """The cache a forward returned: ``past_key_values``, or ``cache_params`` (transformers' Mamba models)."""
    cache = getattr(output, "past_key_values", None)
    return output.cache_params if cache is None and hasattr(output, "cache_params") else cache


def with_cache(model, cache) -> dict:
    """The keyword that passes ``cache`` to ``model``'s forward: ``cache_params`` where it takes that."""
    return {"cache_params" if "cache_params" in inspect.signature(model.forward).parameters else "past_key_values":
            cache}  # fmt: skip


@torch.no_grad()
def _decode(model, prompt: torch.Tensor, steps: int) -> None:
    """Greedy-free decoding: feed fixed tokens one at a time through the cache (the cost, not the text)."""
    cache = cache_of(model(input_ids=prompt, use_cache=True))
    token = prompt[:, -1:]
    for _ in range(steps):
        cache = cache_of(model(input_ids=token, **with_cache(model, cache), use_cache=True))


def graph_seconds_per_call(fn: Callable[[], object], calls: int = 20, repeats: int = 5) -> float:
    """Median seconds of one call of ``fn`` (CUDA), from replays of a CUDA graph of ``calls`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    return statistics.median(times)


def _product_seconds(x: torch.Tensor, weight: torch.Tensor) -> float:
    return graph_seconds_per_call(lambda: F.linear(x, weight))


def _stored_transposed(weight: torch.Tensor) -> bool:
    return weight.shape[0] > 1 and weight.stride() == (1, weight.shape[0])


def projection_layouts(
    model, batch_size: int, timer: Callable[[torch.Tensor, torch.Tensor], float] | None = None, margin: float = 0.9
) -> list[list[int]]:
    """Store every linear layer's weight in the memory layout whose ``batch_size``-row product runs fastest.

    cuBLAS picks its kernel from the shapes and the operands' layouts, and at small batches it sometimes picks
    badly: on an H200 in bf16, a ``[1, 2048] -> 1024`` product (a pruned DeltaNet-1.3B's q and k projections)
    takes 12.5 us on the usual row-major ``[out, in]`` weight and 5.1 us on the same weight stored transposed
    (``benchmarks/projection_kernels.py``). For each shape of ``nn.Linear`` layer (the embeddings excluded) this
    times one product both ways at ``batch_size`` (``timer(x, weight)``: CUDA-graph replays by default) and
    stores the weights of that shape transposed, strides ``(1, out)``, where that is faster by more than
    ``1 - margin``, row-major otherwise. Values, shapes and the layers' forward are unchanged; only where the
    bytes lie. Returns the ``[in, out]`` shapes now stored transposed.
    """
    timer = timer or _product_seconds
    embeddings = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        embeddings.add(id(model.get_output_embeddings().weight))
    groups = defaultdict(list)
    for module in model.modules():
        if type(module) is torch.nn.Linear and id(module.weight) not in embeddings:  # subclasses may read .weight
            weight = module.weight
            groups[(module.in_features, module.out_features, weight.dtype, weight.device)].append(module)
    transposed = []
    for (n_in, n_out, dtype, device), modules in groups.items():
        rows = modules[0].weight.detach().contiguous()
        columns = rows.t().contiguous().t()
        x = torch.randn(batch_size, n_in, dtype=dtype, device=device)
        use_columns = timer(x, columns) < margin * timer(x, rows)
        del rows, columns
        for module in modules:
            if _stored_transposed(module.weight) != use_columns:
                weight = module.weight.detach()
                module.weight.data = weight.t().contiguous().t() if use_columns else weight.contiguous()
        if use_columns:
            transposed.append([n_in, n_out])
    return transposed


def row_major_projections(model) -> None:
    """Undo :func:`projection_layouts`: every linear layer's weight row-major (contiguous) again."""
    for module in model.modules():
        if type(module) is torch.nn.Linear and not module.weight.is_contiguous():
            module.weight.data = module.weight.detach().contiguous()


def _compile_limits():
    """torch.compile's limits for a decoding step: where a dispatched kernel breaks the graph inside a layer, the
    rest of that layer is compiled once per layer (its guards hold the layer's index), so the default of 8
    compilations of one function would leave all but 8 layers uncompiled."""
    return torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=4096)


def compile_refusal(model) -> str | None:
    """Why ``model``'s decoding step may not be compiled (:class:`StaticDecoder` with ``compile``), or None."""
    adapter = adapter_for(model)
    if routed_experts(model) is not None:
        return (
            f"{adapter.family}: compiled decoding of a mixture of experts is not offered: on a GPU its compiled "
            "step was not shown equal to decoding through the model's own cache; graph it uncompiled"
        )
    if adapter.decoding_cache(1, 1) is None:
        return (
            f"{adapter.family}: compiled decoding needs a cache that keeps no count on the host; the model's own "
            "cache advances a Python int every step, so every compiled step would compile again"
        )
    return None


class StaticDecoder:
    """Greedy-free decoding through a cache whose tensors keep their memory from step to step.

    The prompt fills the cache; every :meth:`step` feeds the static ``token`` [B, 1] with the fused recurrent
    steps writing their states in place (:func:`staterank.backends.in_place.states_in_place`), copies any state
    the model returns elsewhere into the tensor the cache held before, and puts those back. A step
    therefore reads and writes the same addresses every time, so it can be captured in a CUDA graph
    and replayed. The cache is the one the model's adapter provides for that
    (:meth:`~staterank.models.base.ModelAdapter.decoding_cache`: transformers' ``StaticCache`` for the
    hybrids, whose attention layers then write into preallocated key/value buffers of ``max_new_tokens``
    more slots than the prompt), or the model's own where it is of fixed size already (fla's); the adapter
    says why another cannot be (:meth:`~staterank.models.base.ModelAdapter.static_cache_tensors`).

    With ``relayout``, the linear layers' weights are first stored in the layout whose product at this batch
    runs fastest (:func:`projection_layouts`, ``timer`` for its timings; the shapes it transposed are in
    ``transposed``); they stay so until :func:`row_major_projections`.
    """

    def __init__(
        self,
        model,
        prompt: torch.Tensor,
        max_new_tokens: int = 256,
        relayout: bool = False,
        timer: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
        compile: bool = False,
    ):
        if compile and (refusal := compile_refusal(model)) is not None:  # before the weights are laid out
            raise BenchError(refusal)
        self.model = model
        self.adapter = adapter_for(model)
        self.capacity = max_new_tokens
        self.steps = 0
        self.transposed = projection_layouts(model, prompt.shape[0], timer) if relayout else []
        cache = self.adapter.decoding_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        given = {} if cache is None else with_cache(model, cache)
        with torch.no_grad():
            self.cache = cache_of(model(input_ids=prompt, use_cache=True, **given))
        try:
            self.states = self.adapter.static_cache_tensors(self.cache)  # the tensors every step writes into
        except StaticCacheError as error:
            raise BenchError(str(error)) from None
        self.token = prompt[:, -1:].clone()
        # fixed shapes; the kernels staterank dispatches (fla's, transformers' choices) are called, not traced
        self._forward = torch.compile(self._logits, dynamic=False) if compile else self._logits

    def _logits(self, token: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=token, past_key_values=self.cache, use_cache=True).logits

    def _count_step(self) -> None:
        if self.steps == self.capacity:
            raise BenchError(f"the decoding cache holds {self.capacity} new tokens; give a larger max_new_tokens")
        self.steps += 1

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Decode one token; returns the logits [B, 1, vocab] (a new tensor, or the graph's output)."""
        self._count_step()
        # fused recurrent steps write the state where it lies: nothing to copy below
        with states_in_place(), _compile_limits():
            logits = self._forward(self.token)
        self.copies = 0  # state tensors the step returned elsewhere, copied back (none where written in place)
        for static, new in zip(self.states, self.adapter.static_cache_tensors(self.cache), strict=True):
            if new is not static:
                static.copy_(new)
                self.copies += 1
        self.adapter.set_static_cache_tensors(self.cache, self.states)
        return logits


class GraphedDecoder(StaticDecoder):
    """:class:`StaticDecoder` whose step is captured once in a CUDA graph and then replayed; its weights are laid
    out for the batch first unless ``relayout`` is off. With ``compile``, the step captured is the model's forward
    compiled by ``torch.compile`` (Inductor fuses the norms, activations and copies between the kernels; the
    warm-up steps compile it), so the graph replays fewer, larger kernels."""

    def __init__(
        self,
        model,
        prompt: torch.Tensor,
        max_new_tokens: int = 256,
        warmup_steps: int = 3,
        relayout: bool = True,
        compile: bool = False,
    ):
        if routed_experts(model) is not None and getattr(model.config, "_experts_implementation", None) == "eager":
            raise BenchError(
                "the model's experts run transformers' eager loop (experts_implementation 'eager'), which syncs with "
                "the host for every expert and cannot be captured; load it with experts_implementation='grouped_mm'"
            )
        super().__init__(model, prompt, max_new_tokens, relayout=relayout, compile=compile)
        # Compilation, Triton autotuning and lazy allocations must happen before capture, on a side stream.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                super().step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = super().step()

    def step(self) -> torch.Tensor:
        self._count_step()
        self.graph.replay()
        return self.logits


def measure_bandwidth_bytes_per_s(device: torch.device, size_bytes: int = 2**30, repeats: int = 5) -> float:
    """Device memory bandwidth as measured by a large copy: (bytes read + bytes written) / seconds (median)."""
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = statistics.median(_timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * size_bytes / seconds


def weight_bytes(model) -> int:
    """Bytes of the model's parameters (a tied embedding counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_bytes_per_step(model, state_bytes_per_seq: int, batch_size: int) -> int:
    """Bytes a decoding step must move at least: every weight read once (the input embedding only for its
    ``batch_size`` rows unless it is tied to the output layer) plus each sequence's state read and written."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    read = weight_bytes(model)
    if not tied:
        read -= (embedding.shape[0] - batch_size) * embedding.shape[1] * embedding.element_size()
    return read + 2 * batch_size * state_bytes_per_seq


#: config fields of the routed experts per MoE layer, and of the experts each token reads, by family
EXPERT_COUNT_FIELDS = ("num_experts", "n_routed_experts", "num_local_experts")
EXPERTS_PER_TOKEN_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk")


def routed_experts(model) -> tuple[int, int, int] | None:
    """``(bytes, E, k)``: the bytes of every routed expert's weights, the experts per MoE layer and those each
    token reads; None for a model without routed experts. Experts are the modules named ``experts`` that hold
    E experts: fused ``[E, ...]`` parameters (transformers' MoE layers) or a list of E modules. Shared experts,
    which every token reads, are not among them."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = next((getattr(config, f) for f in EXPERT_COUNT_FIELDS if getattr(config, f, None)), None)
    per_token = next((getattr(config, f) for f in EXPERTS_PER_TOKEN_FIELDS if getattr(config, f, None)), None)
    if not count or not per_token:
        return None
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != "experts":
            continue
        own = list(module.parameters(recurse=False))
        if isinstance(module, torch.nn.ModuleList) and len(module) == count or own and all(
            p.dim() >= 2 and p.shape[0] == count for p in own
        ):
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return (total, count, per_token) if total else None


def routed_decode_bytes_per_step(model, state_bytes_per_seq: int, batch_size: int) -> int | None:
    """:func:`decode_bytes_per_step` with only the routed experts a batch is expected to read, if routing were
    uniform: each layer's E experts are read ``E (1 - (1 - k / E)^B)`` times in expectation (k of them per
    token). Not a bound (routing that agrees across a batch reads fewer) but the figure a MoE step is to be
    held against at small batches, where the full count overstates its bytes many times. None without experts."""
    experts = routed_experts(model)
    if experts is None:
        return None
    expert_bytes, count, per_token = experts
    read = 1 - (1 - per_token / count) ** batch_size  # the expected fraction of each layer's experts read
    return decode_bytes_per_step(model, state_bytes_per_seq, batch_size) - round(expert_bytes * (1 - read))


def largest_batch(budget_bytes: int, model_bytes: int, state_bytes_per_seq: int) -> int:
    """How many sequences' states fit beside the weights in ``budget_bytes``."""
    return max(0, (budget_bytes - model_bytes) // state_bytes_per_seq)


def _check_batches_fit(models: list[LoadedModel], names: list[str], batch_sizes, budget_bytes: int, where: str):
    for loaded, name in zip(models, names, strict=True):
        fits = largest_batch(budget_bytes, weight_bytes(loaded.model), loaded.adapter.state_bytes_per_seq())
        too_large = [b for b in batch_sizes if b > fits]
        if too_large:
            raise BenchError(
                f"{name}: decode batch {max(too_large)} does not fit {where} ({budget_bytes / 2**30:.2f} GiB); "
                f"the largest batch whose states fit beside the weights is {fits}"
            )


def _graph_decoders(
    models: list[LoadedModel], prompt: torch.Tensor, max_new_tokens: int, compile: bool = False
) -> tuple[list[GraphedDecoder], str | None]:
    """Capture a :class:`GraphedDecoder` per model on ``prompt``; on failure, say why instead."""
    if prompt.device.type != "cuda":
        return [], "CUDA graphs need a CUDA device"
    try:
        return [GraphedDecoder(loaded.model, prompt, max_new_tokens, compile=compile) for loaded in models], None
    except (BenchError, RuntimeError) as error:
        return [], str(error).splitlines()[0]


def bench(
    models: list[LoadedModel | Callable[[], LoadedModel]],
    names: list[str],
    batch_size: int = 8,
    seq_len: int = 2048,
    decode_batch_sizes: tuple[int, ...] = (1, 64),
    decode_steps: int = 32,
    warmup: int = 1,
    repeats: int = 5,
    memory_budget_bytes: int | None = None,
    seed: int = 0,
    sequential: bool = False,
    on_measured: Callable[[dict], None] | None = None,
    compile_decode: bool = False,
) -> dict:
    """Measure every model on the same random token ids; return the JSON of DESIGN.md section 6.

    ``models`` are loaded models, or functions that load one. With ``sequential``, for models that do not fit
    the device together, each is loaded, measured and freed in turn, so its repeats are not interleaved with
    the others' (the result says ``"interleaved": false``); after each model but the last, ``on_measured`` gets
    the result so far, whose ``"models_pending"`` names the models still to measure. With ``compile_decode``, the
    graphed decoding steps are the models' forwards compiled by ``torch.compile`` (:class:`GraphedDecoder`).
    """
    if not models:
        raise BenchError("give at least one model")
    groups = [[m] for m in models] if sequential else [models]
    names_of = [[n] for n in names] if sequential else [names]
    settings = dict(batch_size=batch_size, seq_len=seq_len, decode_steps=decode_steps, warmup=warmup,
                    repeats=repeats, interleaved=not sequential or len(models) == 1,
                    decode_graph_compiled=compile_decode)  # fmt: skip
    rows: list[dict] = []
    graphs_unavailable = None
    inputs = None
    for group, group_names in zip(groups, names_of, strict=True):
        loaded = [m() if callable(m) else m for m in group]
        vocab_sizes = {m.model.config.vocab_size for m in loaded} | ({inputs["vocab_size"]} if inputs else set())
        if len(vocab_sizes) > 1:
            raise BenchError(f"models with different vocabularies ({sorted(vocab_sizes)}) cannot share inputs")
        if inputs is None:
            inputs = _inputs(loaded[0], batch_size, seq_len, decode_batch_sizes, seed)
        group_rows, unavailable = _measure(
            loaded, group_names, inputs, decode_steps, warmup, repeats, memory_budget_bytes, compile_decode
        )
        rows += group_rows
        graphs_unavailable = graphs_unavailable or unavailable
        device, dtype = inputs["device"], str(next(loaded[0].model.parameters()).dtype).removeprefix("torch.")
        del loaded, group
        if sequential and device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        pending = names[len(rows) :]
        if on_measured is not None and pending:
            partial = _result(rows, device, dtype, inputs, graphs_unavailable, decode_batch_sizes, **settings)
            on_measured({**partial, "models_pending": pending})
    return _result(rows, device, dtype, inputs, graphs_unavailable, decode_batch_sizes, **settings)


def _result(rows: list[dict], device, dtype: str, inputs: dict, graphs_unavailable, decode_batch_sizes,
            **settings) -> dict:  # fmt: skip
    """The JSON of DESIGN.md section 6 for the rows measured; ``settings`` are the run's own fields."""
    first = rows[0]
    speedup = {
        row["name"]: {
            "prefill": row["prefill_tokens_per_s"] / first["prefill_tokens_per_s"],
            "decode": {
                b: first["decode_ms_per_token"][b] / row["decode_ms_per_token"][b] for b in row["decode_ms_per_token"]
            },
            "decode_graph": {
                b: first["decode_graph_ms_per_token"][b] / row["decode_graph_ms_per_token"][b]
                for b in row["decode_graph_ms_per_token"]
            }
            if row["decode_graph_ms_per_token"] and first["decode_graph_ms_per_token"]
            else None,
            "state_bytes": first["state_bytes_per_seq"] / row["state_bytes_per_seq"],
        }
        for row in rows[1:]
    }
    graphed_all = all(row["decode_graph_ms_per_token"] is not None for row in rows)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype,
        **settings,
        "decode_modes": ["eager", "graph"] if graphed_all and decode_batch_sizes else ["eager"],
        "decode_graph_unavailable": graphs_unavailable,
        "bandwidth_bytes_per_s": inputs["bandwidth"],
        "models": rows,
        "speedup": speedup,
    }


def _inputs(loaded: LoadedModel, batch_size: int, seq_len: int, decode_batch_sizes, seed: int) -> dict:
    """The token ids every model sees (from the first model's vocabulary), and the device's copy bandwidth."""
    device = next(loaded.model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    vocab = loaded.model.config.vocab_size
    return {
        "device": device,
        "vocab_size": vocab,
        "ids": torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device),
        "prompts": {b: torch.randint(0, vocab, (b, 16), generator=generator).to(device) for b in decode_batch_sizes},
        "bandwidth": measure_bandwidth_bytes_per_s(device, 2**30 if device.type == "cuda" else 2**27),
    }


def _measure(
    models: list[LoadedModel],
    names: list[str],
    inputs: dict,
    decode_steps: int,
    warmup: int,
    repeats: int,
    memory_budget_bytes: int | None,
    compile_decode: bool = False,
) -> tuple[list[dict], str | None]:
    """One row per model (repeats interleaved across ``models``), and why graphed decoding did not run, if not."""
    device, ids, prompts = inputs["device"], inputs["ids"], inputs["prompts"]
    batch_size, seq_len = ids.shape
    decode_batch_sizes = tuple(prompts)
    if compile_decode and decode_batch_sizes:
        refusals = [compile_refusal(loaded.model) for loaded in models]
        if any(refusals):
            raise BenchError(next(r for r in refusals if r) + " (run without --compile)")
    if memory_budget_bytes is not None:
        _check_batches_fit(models, names, decode_batch_sizes, memory_budget_bytes, "the memory budget")
    if device.type == "cuda":
        _check_batches_fit(
            models, names, decode_batch_sizes, torch.cuda.get_device_properties(device).total_memory, "this GPU"
        )

    # Largest batch first: fla autotunes some decoding kernels once per process on keys without the batch (its
    # causal_conv1d_update_kernel on D and W), so the first batch decoded picks the configuration every later
    # batch runs; at batch 1 every configuration takes about as long, at batch 256 one picked at batch 1 ran
    # 11x slower (41 against 3.7 us per launch, DeltaNet-1.3B on an H200).
    largest_first = sorted(decode_batch_sizes, reverse=True)
    prefill: dict[int, list[float]] = {i: [] for i in range(len(models))}
    decode: dict[tuple[int, int], list[float]] = {(i, b): [] for i in range(len(models)) for b in decode_batch_sizes}
    graphed: dict[tuple[int, int], list[float]] = {key: [] for key in decode}
    transposed: dict[tuple[int, int], list[list[int]]] = {}  # the projections each graphed batch stored transposed
    peak: dict[int, int | None] = {}
    for repeat in range(warmup + repeats):
        for i, loaded in enumerate(models):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = _timed(lambda m=loaded.model: _prefill(m, ids), device)
            if repeat >= warmup:
                prefill[i].append(seconds)
                peak[i] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            for b in largest_first:
                seconds = _timed(lambda m=loaded.model, p=prompts[b]: _decode(m, p, decode_steps), device)
                if repeat >= warmup:
                    decode[(i, b)].append(seconds)

    # Graphed decoding, one batch size at a time: each decoder holds its batch's states and its graph's memory.
    graphs_unavailable = None
    for b in largest_first:
        # the warm-up and capture steps, then every timed and untimed run
        decoders, graphs_unavailable = _graph_decoders(
            models, prompts[b], 4 + decode_steps * (warmup + repeats), compile_decode
        )
        if graphs_unavailable is not None:
            break
        for repeat in range(warmup + repeats):
            for i, decoder in enumerate(decoders):
                seconds = _timed(lambda d=decoder: [d.step() for _ in range(decode_steps)], device)
                if repeat >= warmup:
                    graphed[(i, b)].append(seconds)
        for i, decoder in enumerate(decoders):
            transposed[(i, b)] = decoder.transposed
        del decoders
    for loaded in models:  # the models as they were given
        row_major_projections(loaded.model)
    graphs_ran = bool(decode_batch_sizes) and graphs_unavailable is None
    rows = []
    for i, (loaded, name) in enumerate(zip(models, names, strict=True)):
        prefill_time = Timing.of(prefill[i])
        state_bytes = loaded.adapter.state_bytes_per_seq()
        weights = weight_bytes(loaded.model)
        row = {
            "name": name,
            "prefill_tokens_per_s": batch_size * seq_len / prefill_time.median,
            "prefill_spread": prefill_time.spread,
            "decode_ms_per_token": {},
            "decode_spread": {},
            "decode_graph_ms_per_token": {} if graphs_ran else None,
            "decode_graph_spread": {} if graphs_ran else None,
            "decode_graph_transposed_projections": {} if graphs_ran else None,
            "decode_bound_ms_per_token": {},
            # MoE only: the bound with the routed experts a batch is expected to read (routed_decode_bytes_per_step)
            "decode_routed_estimate_ms_per_token": {} if routed_experts(loaded.model) else None,
            "peak_mem_bytes": peak.get(i),
            "state_bytes_per_seq": state_bytes,
            "weight_bytes": weights,
        }
        for b in decode_batch_sizes:
            # the prompt's prefill is part of each run; at 16 tokens it is small next to decode_steps steps
            timing = Timing.of(decode[(i, b)])
            row["decode_ms_per_token"][str(b)] = 1000 * timing.median / decode_steps
            row["decode_spread"][str(b)] = timing.spread
            if graphs_ran:
                timing = Timing.of(graphed[(i, b)])
                row["decode_graph_ms_per_token"][str(b)] = 1000 * timing.median / decode_steps
                row["decode_graph_spread"][str(b)] = timing.spread
                row["decode_graph_transposed_projections"][str(b)] = transposed[(i, b)]
            bound_bytes = decode_bytes_per_step(loaded.model, state_bytes, b)
            row["decode_bound_ms_per_token"][str(b)] = 1000 * bound_bytes / inputs["bandwidth"]
            routed = routed_decode_bytes_per_step(loaded.model, state_bytes, b)
            if routed is not None:  # MoE: the experts a batch reads under uniform routing
                row["decode_routed_estimate_ms_per_token"][str(b)] = 1000 * routed / inputs["bandwidth"]
        if memory_budget_bytes is not None:
            row["max_batch_in_budget"] = largest_batch(memory_budget_bytes, weights, state_bytes)
        rows.append(row)
    return rows, graphs_unavailable
