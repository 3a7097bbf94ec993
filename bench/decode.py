"""Benchmark: decode tokens/s of a Llama-2-7B-shaped model with RANDOM weights, bf16 against modelpress's
weight-only QuantLinear (RTN: int4/g128, nf4/g64, fp8-e4m3/channel, int4-asym/g128).

By default it times what a user gets: `generate` at batch 1 on the --paths decode paths (below, "user path").
`--harness` times one decode step of a hand-built loop instead, at batch 1 and 16, beside peers:

    PYTHONPATH=src python bench/decode.py --harness            # CUDA, the 7B shape; JSON to $OUT/decode_h100.json
    PYTHONPATH=src python bench/decode.py --harness --device cpu --tiny  # the code path on a tiny config

The weights are random normals (std 0.02, norms 1): speed does not depend on their values, the generated
text means nothing. The model is built on the meta device, materialized with `to_empty` on the target
device and filled there in bf16. Each quantized model shares the bf16 model's embeddings, norms and head
(RTN leaves the head in bf16) and quantizes its linear layers one by one on the device.

A decode step is one forward pass of one token per sequence on a static KV cache of prompt + steps tokens
(modelpress's `StaticCache`, inference/static_decode.py: it writes at a device tensor of positions, and the
attention mask is a 4-D device tensor rebuilt from it), followed by the greedy argmax written back into the
input buffer and the position advanced in place, so the step needs no host values and replays as a CUDA graph.
Timed two ways, each as the median over repeats of `--steps` consecutive steps after a `--prompt`-token random
prompt:
- eager: the step called from Python (host overhead included);
- graph: the step captured once in a CUDA graph and replayed `--steps` times.
ms/token is the time of one step (all sequences); tokens/s = batch x steps / seconds. "floor" is the time
to read the weights once at 3.08 TB/s (the H100's measured read ceiling); "floor + KV" adds the KV cache a
step reads (the attention reads the whole static buffer). Peers (PyTorch's int4 tinygemm kernel; bitsandbytes
NF4 when importable) run the same steps with their own linear modules; missing ones are skipped and named.

The user path (the default; --user-path is accepted and changes nothing) measures what a user gets: `modelpress.inference.decoding.generate` at batch 1 (greedy,
`--steps` new tokens after the `--prompt`-token prompt), once per decode path: eager (DynamicCache, Python
per token) and auto (on CUDA: static cache + the decode step captured in a CUDA graph, capture included in
the call). After one short warm-up call per path (Triton compilation), "call tok/s" is the GenerationResult's
figure (prefill and capture included) and "decode tok/s" the rate from the second token to the last (steady
decoding: the graph path captures during its first step).

    PYTHONPATH=src python bench/decode.py --user-path --formats int4/g128 nf4/g64 --steps 128

`--batches B ...` (user path) also times `generate_batch` (inference/batch_decode.py) on B random prompts of
`--prompt` tokens each: tokens/s count every row's tokens; "same tokens as bf16" compares the first row's.

    PYTHONPATH=src python bench/decode.py --formats int4/g128 --paths auto --batches 1 16 --steps 128

`--kv-cache MODES` (user path) repeats each call with `GenerationSettings.kv_cache` set to each mode (float,
int8, fp8, int4, int2): the auto path then decodes on static_kv.StaticQuantizedCache (codes written at the
position, the whole static buffer dequantized for attention every step), the eager path on QuantizedKVCache.
"kv MB" is what the static cache allocates for prompt + steps positions (bfloat16 states for float).
Rows are written to the JSON as they are measured.

    PYTHONPATH=src python bench/decode.py --user-path --formats int4/g128 --kv-cache float int8 fp8 \
        --prompt 2048 --steps 128
    PYTHONPATH=src python bench/decode.py --user-path --device cpu --tiny --formats int4/g128 \
        --kv-cache float int8 fp8 int4 --prompt 16 --steps 8        # the code path on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.formats.scheme import WeightScheme
from modelpress.inference.batch_decode import generate_batch
from modelpress.inference.decoding import GenerationSettings, generate
from modelpress.inference.kv_cache import CACHE_MODES, KVCacheConfig
from modelpress.inference.sampling import SamplingConfig
from modelpress.inference.static_decode import StaticCache
from modelpress.inference.static_kv import make_static_cache
from modelpress.nn.quant_linear import QuantLinear

SHAPES = {  # Llama-2-7B, Llama-3-8B (grouped-query heads) and a tiny model (CPU test of the code path)
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000},
}
FORMATS = ("int4/g128", "nf4/g64", "fp8-e4m3/channel", "int4-asym/g128")  # in order of importance
READ_TBS = 3.08  # the issue's anchor: H100 read bandwidth ceiling, TB/s
WEIGHT_STD = 0.02


# ---------------------------------------------------------------------------------------------- the model
def llama_config(shape: str, max_positions: int = 4096) -> LlamaConfig:
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_positions, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return config


@torch.no_grad()
def random_llama(config: LlamaConfig, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0) -> LlamaForCausalLM:
    """A LlamaForCausalLM with random normal weights, allocated and filled directly on `device` in `dtype`."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, WEIGHT_STD, generator=gen)
    for name, module in model.named_modules():  # non-persistent buffers (rotary inv_freq) are garbage after to_empty
        if name.endswith("rotary_emb"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], type(module)(config).to(device))
    return model


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy whose parameters and buffers are the original's tensors (no weight memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def quantized_copy(model: nn.Module, spec: str) -> nn.Module:
    """RTN-quantize the linear layers of a shared copy of `model`, layer by layer on its device."""
    quantized = shared_copy(model)
    quantize_rtn(quantized, RTNConfig(WeightScheme.parse(spec)))
    return quantized


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of weights one decode step reads: every linear layer (packed or not) and the head."""
    quantized = dense = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            quantized += module.weight_nbytes
        elif isinstance(module, nn.Linear):
            dense += module.weight.numel() * module.weight.element_size()
        elif hasattr(module, "peer_nbytes"):
            quantized += module.peer_nbytes
    return {"quantized_layer_bytes": quantized, "dense_layer_bytes": dense, "weight_bytes": quantized + dense}


# ---------------------------------------------------------------------------------------------- peers
class TorchInt4Linear(nn.Module):
    """PyTorch's built-in int4 kernel (aten._weight_int4pack_mm, CUDA): asymmetric int4 per group of 128,
    w = (c - 8) * s + z with c = round((w - min) / s)."""

    def __init__(self, weight: torch.Tensor, group: int = 128, inner_k_tiles: int = 8) -> None:
        super().__init__()
        n, k = weight.shape
        w = weight.float().reshape(n, k // group, group)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8)
        codes = ((w - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        zero = low + 8 * scale
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles))
        self.register_buffer("scales_zeros", torch.cat([scale, zero], -1).permute(1, 0, 2).contiguous()
                             .to(torch.bfloat16))
        self.group, self.out_features = group, n
        self.peer_nbytes = sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.qweight, self.group,
                                               self.scales_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)


def bnb_nf4_linear(weight: torch.Tensor) -> nn.Module:
    import bitsandbytes as bnb  # optional peer

    n, k = weight.shape
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.detach().cpu(), requires_grad=False, quant_type="nf4")
    layer = layer.to(weight.device)
    layer.peer_nbytes = layer.weight.numel() * layer.weight.element_size() + n * (k // 64) * 4
    return layer


PEERS = {"torch-int4/g128 (peer)": TorchInt4Linear, "bnb-nf4 (peer)": bnb_nf4_linear}


def peer_copy(model: nn.Module, build) -> nn.Module:
    """Shared copy of `model` whose linear layers (not the head) are replaced by `build(weight)`."""
    out = shared_copy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent), leaf, build(module.weight))
    return out


# ---------------------------------------------------------------------------------------------- the decoder
class Decoder:
    """Static buffers of one greedy decode at a fixed batch on a PositionCache: `prefill()` fills the cache
    with the prompt; `start()` resets the position to the end of the prompt; `step()` runs one token per
    sequence, writes the argmax back as the next input and advances the position, all on the device."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, steps: int) -> None:
        self.model, self.prompt = model, prompt
        batch, self.prompt_len = prompt.shape
        device = prompt.device
        self.max_len = self.prompt_len + steps
        self.cache = StaticCache(model.config.num_hidden_layers, self.max_len)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)  # every row at the same position
        self.kv_arange = torch.arange(self.max_len, device=device)
        dtype = next(model.parameters()).dtype
        self.masked = torch.finfo(dtype).min
        self.mask = torch.zeros(batch, 1, 1, self.max_len, dtype=dtype, device=device)
        self.first_token: torch.Tensor | None = None

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        batch, t = self.prompt.shape
        positions = torch.arange(t, device=self.prompt.device)
        allowed = self.kv_arange[None, :] <= positions[:, None]  # (T, L) causal over the static buffer
        mask = torch.where(allowed, 0.0, self.masked).to(self.mask.dtype)[None, None].expand(batch, 1, t, -1)
        self.cache.index = positions
        logits = self.model(input_ids=self.prompt, position_ids=positions[None].expand(batch, -1),
                            attention_mask=mask, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        self.first_token = logits[:, -1].argmax(-1, keepdim=True)
        return logits[:, -1]

    def start(self) -> None:
        self.ids.copy_(self.first_token)
        self.pos.fill_(self.prompt_len)

    @torch.no_grad()
    def step(self) -> None:
        self.cache.index = self.pos[0]
        self.mask.copy_(torch.where(self.kv_arange <= self.pos[:, :, None, None], 0.0, self.masked))
        logits = self.model(input_ids=self.ids, position_ids=self.pos, attention_mask=self.mask,
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        self.ids.copy_(logits[:, -1:].argmax(-1))
        self.pos.add_(1)


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    """CUDA events on CUDA, perf_counter elsewhere; milliseconds."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        began = time.perf_counter()
        fn()
        return (time.perf_counter() - began) * 1e3


def decode_tokens(dec: Decoder, steps: int, run_step) -> list[list[int]]:
    dec.start()
    out = []
    for _ in range(steps):
        run_step()
        out.append(dec.ids[:, 0].clone())
    return torch.stack(out, 1).tolist()


def time_eager(dec: Decoder, timer: Timer, steps: int, repeats: int) -> tuple[float, list[list[int]]]:
    tokens = decode_tokens(dec, min(steps, 4), dec.step)  # warm-up (kernel compilation, allocator)
    times = []
    for _ in range(repeats):
        dec.start()
        times.append(timer(lambda: [dec.step() for _ in range(steps)]) / steps)
    tokens = decode_tokens(dec, steps, dec.step)
    return statistics.median(times), tokens


def time_graph(dec: Decoder, timer: Timer, steps: int, repeats: int) -> tuple[float, list[list[int]]]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        dec.start()
        for _ in range(3):
            dec.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    dec.start()
    with torch.cuda.graph(graph):
        dec.step()
    times = []
    for _ in range(repeats):
        dec.start()
        times.append(timer(lambda: [graph.replay() for _ in range(steps)]) / steps)
    tokens = decode_tokens(dec, steps, graph.replay)
    return statistics.median(times), tokens


def host_syncs(fn) -> list[str]:
    """Ops in `fn` that read a device value on the host or make a tensor from host data (each would break or
    freeze a CUDA graph capture); run on the CPU to check the step before a GPU run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero,
                                       torch.ops.aten.is_nonzero, torch.ops.aten.equal, torch.ops.aten.lift_fresh):
                found.append(str(func))
            return func(*args, **(kwargs or {}))

    with Watch():
        fn()
    return found


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


# ---------------------------------------------------------------------------------------------- main
def measure(name: str, model: nn.Module, prompts: dict, args, timer: Timer, device: torch.device,
            base: dict) -> list[dict]:
    rows = []
    nbytes = weight_bytes(model)
    for batch, prompt in prompts.items():
        dec = Decoder(model, prompt, args.steps)
        dec.prefill()  # warm-up: kernel compilation for the prefill shapes
        prefill_ms = statistics.median(timer(dec.prefill) for _ in range(3))
        row = {"model": name, "batch": batch, **nbytes, "prefill_ms": prefill_ms, "kv_bytes": dec.cache.kv_bytes()}
        if device.type == "cpu" and not rows:
            dec.start()
            row["host_syncs_in_step"] = host_syncs(dec.step)
        row["eager_ms"], eager_tokens = time_eager(dec, timer, args.steps, args.repeats)
        if device.type == "cuda" and not args.no_graph:
            try:
                row["graph_ms"], graph_tokens = time_graph(dec, timer, args.steps, args.repeats + 2)
                row["graph_vs_eager_tokens_equal"] = token_agreement(eager_tokens, graph_tokens)
            except Exception as err:  # noqa: BLE001  (report it and keep the eager figures)
                row["graph_error"] = f"{type(err).__name__}: {err}"[:400]
                torch.cuda.synchronize()
        best = row.get("graph_ms", row["eager_ms"])
        row["tokens_per_s_eager"] = batch * 1e3 / row["eager_ms"]
        if "graph_ms" in row:
            row["tokens_per_s_graph"] = batch * 1e3 / row["graph_ms"]
        row["floor_ms"] = nbytes["weight_bytes"] / (READ_TBS * 1e12) * 1e3
        row["floor_kv_ms"] = (nbytes["weight_bytes"] + row["kv_bytes"]) / (READ_TBS * 1e12) * 1e3
        row["floor_fraction"] = row["floor_ms"] / best
        ref = base.get(batch)
        if ref is None:
            base[batch] = row
            row["tokens"] = eager_tokens
        else:
            row["speedup_eager"] = ref["eager_ms"] / row["eager_ms"]
            if "graph_ms" in row and "graph_ms" in ref:
                row["speedup_graph"] = ref["graph_ms"] / row["graph_ms"]
            row["same_tokens_as_bf16"] = token_agreement(ref["tokens"], eager_tokens)
        rows.append(row)
        del dec
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def static_kv_bytes(config: LlamaConfig, mode: str, max_len: int) -> int:
    """Bytes the static cache of `mode` allocates for `max_len` positions of bfloat16 states: one layer built on
    the CPU, times the layers."""
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = make_static_cache(1, max_len, KVCacheConfig(mode))
    cache.index = torch.zeros(1, dtype=torch.long)
    states = torch.zeros(1, heads, 1, head_dim, dtype=torch.bfloat16)
    cache.update(states, states, 0)
    return cache.kv_bytes() * config.num_hidden_layers


def measure_user_path(name: str, model: nn.Module, prompts: dict[int, torch.Tensor], args, base: dict,
                      on_row=None) -> list[dict]:
    """generate() (batch 1) or generate_batch() (more rows) on each batch size, decode path and KV cache mode;
    tokens/s of the whole call and of the decode alone. `on_row(rows)` is called after each row (the JSON is
    written as rows come)."""
    rows = []
    for batch, prompt in prompts.items():
        ids = prompt[0].tolist() if batch == 1 else prompt.tolist()
        for kv in args.kv_cache:
            for path in args.paths:
                row = user_row(name, model, ids, path, kv, args)
                compare_user_row(row, base, rows)
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
                print(f"  {name} batch {batch} {path} ({row['ran']}) kv {kv}: {row['call_tokens_per_s']:.1f} tok/s "
                      f"per call, {fmt(row['decode_tokens_per_s'], '.1f')} tok/s decoding", file=sys.stderr,
                      flush=True)
    return rows


def user_row(name: str, model: nn.Module, ids: list[int] | list[list[int]], path: str, kv: str, args) -> dict:
    greedy = SamplingConfig(temperature=0.0)
    # "auto+compile": the auto path with GenerationSettings.compile; "+nofuse": without the decode-time fusions;
    # "+noattn": with every fusion but the split-cache attention (to measure that one); "+nopdl": the decode-time
    # kernels (norms, rotary, KV writes, attention, activation) launched without PDL (the GEMVs keep theirs);
    # "+mhasplit": the split-cache attention for one token of a model with a key/value head per query head at any
    # cache length (fusion.MHA_SPLIT_MAX_POSITIONS: up to 1024 positions by default); "+nomma": int4 layers keep
    # their stored layout and the CUDA-core GEMV (fusion.RELAYOUT off); "+split": the tensor-core GEMV with K split
    # for weights whose row tiles do not fill the GPU (triton_backend.MMA_SPLIT_K on); "+noact": the MLP's activation
    # as its own kernel after the [gate | up] GEMV, not in its epilogue (fusion.INTERLEAVE off); "+nocodes": the
    # split-cache attention reads a float copy of an int8 KV cache, dequantized each step (fusion.READ_INT8_CODES off);
    # "+nokv8": an int8 KV cache quantized by the codec's PyTorch kernels, not one Triton kernel a layer
    # (static_kv.WRITE_INT8_KERNEL off); "+novector": the split-cache attention's tile kernels for one query row a
    # key/value head, not its one-row variant (triton_attention.VECTOR_ROWS off); "+mhasdpa": SDPA for one token of
    # a model with a key/value head per query head at any cache length (float caches; an int8 cache's codes stay on
    # the kernels); "+nofold": the kernels decode an int8 cache's codes to the query's dtype, not apply its scales
    # to scores and probabilities (triton_attention.FOLD_CODE_SCALES off); "+oldplan": the split-cache attention as
    # planned before session 38 (each split one run of blocks; the one-row kernels in blocks of 64 positions with 4
    # warps and 4 waves, of 128 with 4 warps and 8 waves on int8 codes, and for int8 codes only where their programs
    # fill the GPU); "+oldtiles": M <= 16 matmuls of int4, NF4 and wide int8 and fp8 weights (8-bit at M = 1 too) on
    # the tiles of before session 39; "+nolaid": layers re-laid for the rows mode (2 to 8 rows) read x as stored, not
    # the copy in fragment order their norms write (fusion.LAY_NORMS off)
    decode, *flags = path.split("+")
    options = dict(decode=decode, sampling=greedy, kv_cache=kv, compile="compile" in flags, fuse="nofuse" not in flags)
    from modelpress.inference import fusion, static_kv
    from modelpress.nn import triton_attention, triton_backend

    with (patched(fusion, "_fuse_attention", lambda model, report: [], "noattn" in flags),
          patched(triton_backend, "PDL_KERNELS", False, "nopdl" in flags),
          patched(fusion, "MHA_SPLIT_MAX_POSITIONS", 1 << 40, "mhasplit" in flags),
          patched(fusion, "MHA_SPLIT_MAX_POSITIONS", 0, "mhasdpa" in flags),
          patched(fusion, "RELAYOUT", False, "nomma" in flags),
          patched(triton_backend, "MMA_SPLIT_K", True, "split" in flags),
          patched(fusion, "INTERLEAVE", False, "noact" in flags),
          patched(fusion, "LAY_NORMS", False, "nolaid" in flags),
          patched(fusion, "READ_INT8_CODES", False, "nocodes" in flags),
          patched(static_kv, "WRITE_INT8_KERNEL", False, "nokv8" in flags),
          patched(triton_attention, "VECTOR_ROWS", False, "novector" in flags),
          patched(triton_attention, "FOLD_CODE_SCALES", False, "nofold" in flags),
          patched(triton_attention, "INTERLEAVED_SPLITS", False, "oldplan" in flags),
          patched(triton_attention, "ONE_ROW_PLAN", (64, 4.0, 4), "oldplan" in flags),
          patched(triton_attention, "ONE_ROW_CODES_PLAN", (128, 8.0, 4), "oldplan" in flags),
          patched(triton_attention, "VECTOR_MIN_WAVES_CODES", 1.0, "oldplan" in flags),
          patched(triton_backend, "SMALL_M_TILES", triton_backend.SMALL_M_TILES_OTHER, "oldtiles" in flags,
                  triton_backend.choose_plan.cache_clear)):
        return timed_user_row(name, model, ids, path, kv, options, args)


@contextlib.contextmanager
def patched(module, name: str, value, active: bool, clear=None):
    """module.name set to value while the block runs (where active), then restored; clear (a cache's clear, for
    values a cached function reads) runs after each change."""
    original = getattr(module, name)
    if active:
        setattr(module, name, value)
        clear and clear()
    try:
        yield
    finally:
        setattr(module, name, original)
        active and clear and clear()


def timed_user_row(name: str, model: nn.Module, ids: list[int] | list[list[int]], path: str, kv: str, options: dict,
                   args) -> dict:
    """One call of generate (ids: one prompt) or generate_batch (ids: a list of prompts) after a short warm-up."""
    batch = len(ids) if isinstance(ids[0], list) else 1
    began = time.perf_counter()
    stamps: list[float] = []

    def run(steps: int):
        settings = GenerationSettings(max_new_tokens=steps, **options)
        stamps.clear()
        if batch == 1:
            return generate(model, ids, settings, on_tokens=lambda _: stamps.append(time.perf_counter()))
        return generate_batch(model, ids, settings, on_step=lambda _: stamps.append(time.perf_counter()))

    for module in model.modules():  # launchers prepared by the path before keep its plans and flags
        if isinstance(module, QuantLinear):
            module._launchers = {}
    run(4)  # warm-up (compilation included)
    warm_s = time.perf_counter() - began
    result = run(args.steps)
    # from the second token on: the first step of the graph path also warms up and captures
    decode_tps = batch * (len(stamps) - 2) / (stamps[-1] - stamps[1]) if len(stamps) > 2 else None
    tokens, prompt_len = (result.tokens, len(ids)) if batch == 1 else (result.tokens[0], len(ids[0]))
    return {"model": name, "batch": batch, "path": path, "ran": result.decode_path, "fusions": result.fusions,
            "batched": getattr(result, "batched", True), "kv_cache": kv,
            "kv_bytes_static": batch * static_kv_bytes(model.config, kv, prompt_len + args.steps),
            "new_tokens": len(tokens) if batch == 1 else result.new_tokens, "seconds": result.seconds,
            "call_tokens_per_s": result.tokens_per_s, "decode_tokens_per_s": decode_tps, "warm_up_seconds": warm_s,
            "tokens": tokens}


def compare_user_row(row: dict, base: dict, rows: list[dict]) -> None:
    """Against the bf16 model on the same path and KV mode, and against the same model's float KV cache."""
    decode_tps = row["decode_tokens_per_s"]
    ref = base.setdefault((row["batch"], row["path"], row["kv_cache"]), row)
    if ref is not row:
        row["decode_vs_bf16"] = decode_tps / ref["decode_tokens_per_s"] if decode_tps else None
        row["same_tokens_as_bf16"] = token_agreement([ref["tokens"]], [row["tokens"]])
    float_kv = next((r for r in rows if r["path"] == row["path"] and r["kv_cache"] == "float"
                     and r["batch"] == row["batch"]), None)
    if float_kv is not None and row["kv_cache"] != "float":
        row["decode_vs_float_kv"] = decode_tps / float_kv["decode_tokens_per_s"] if decode_tps else None
        row["same_tokens_as_float_kv"] = token_agreement([float_kv["tokens"]], [row["tokens"]])


def user_table(rows: list[dict]) -> str:
    lines = ["| batch | model | decode path (ran) | KV cache | kv MB | call tok/s | decode tok/s | decode vs bf16 "
             "| same tokens as bf16 | decode vs float KV | same tokens as float KV |",
             "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ran = r["ran"] if r.get("batched", True) else f"{r['ran']}, one at a time"
        lines.append(f"| {r['batch']} | {r['model']} | {r['path']} ({ran}) | {r['kv_cache']} "
                     f"| {r['kv_bytes_static'] / 1e6:.1f} "
                     f"| {r['call_tokens_per_s']:.1f} | {fmt(r['decode_tokens_per_s'], '.1f')} "
                     f"| {fmt(r.get('decode_vs_bf16'), '.2f')} | {fmt(r.get('same_tokens_as_bf16'), '.0%')} "
                     f"| {fmt(r.get('decode_vs_float_kv'), '.2f')} | {fmt(r.get('same_tokens_as_float_kv'), '.0%')} |")
    return "\n".join(lines)


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = [("| batch | model | weight GB | floor ms | eager ms/tok | graph ms/tok | tok/s (graph) | vs bf16 (graph) "
              "| vs bf16 (eager) | % of floor |"),
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: r["batch"]):
        tps = r.get("tokens_per_s_graph", r["tokens_per_s_eager"])
        lines.append(f"| {r['batch']} | {r['model']} | {r['weight_bytes'] / 1e9:.2f} | {r['floor_ms']:.2f} | "
                     f"{r['eager_ms']:.2f} | {fmt(r.get('graph_ms'), '.2f')} | {tps:.1f} | "
                     f"{fmt(r.get('speedup_graph'), '.2f')} | {fmt(r.get('speedup_eager'), '.2f')} | "
                     f"{100 * r['floor_fraction']:.0f}% |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--tiny", action="store_true", help="the tiny shape (CPU test of the code path)")
    p.add_argument("--formats", nargs="*", default=list(FORMATS))
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="batch sizes (default: 1 on the user path, where more rows go through generate_batch; "
                        "1 16 with --harness)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="eager repeats (graph: 2 more)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--max-seconds", type=float, default=330.0, help="skip the remaining models after this")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--user-path", action="store_true",
                   help="the default: time modelpress's generate() at batch 1 on the --paths decode paths")
    p.add_argument("--harness", action="store_true",
                   help="time one decode step of a hand-built loop instead, eager and graph-replayed, at each "
                        "--batches size, beside peers (PyTorch's int4 kernel, bitsandbytes NF4)")
    p.add_argument("--kv-cache", nargs="+", default=["float"], choices=CACHE_MODES, metavar="MODE",
                   help=f"user path: KV cache modes to time, each on every path ({', '.join(CACHE_MODES)}; "
                        "default float)")
    p.add_argument("--paths", nargs="+", default=["eager", "auto"],
                   choices=["eager", "auto", "static", "graph", "auto+compile", "static+compile", "eager+nofuse",
                            "auto+nofuse", "auto+noattn", "auto+nopdl", "auto+mhasplit", "auto+nomma",
                            "auto+split", "auto+noact", "auto+split+noact", "auto+compile+nofuse", "auto+nocodes",
                            "auto+nokv8", "auto+novector", "auto+mhasdpa", "auto+nofold", "auto+oldplan",
                            "auto+oldtiles", "auto+nolaid"],
                   help="user path: decode paths to time (default eager auto); +compile: GenerationSettings.compile; "
                        "+nofuse: GenerationSettings.fuse=False (no decode-time fusions); +noattn: every fusion but "
                        "the split-cache attention; +nopdl: the decode-time kernels without PDL; +mhasplit: the "
                        "split-cache attention for one token of a model with as many key/value heads as query heads "
                        "at any cache length (by default up to 1024 positions); +nomma: int4 layers on the CUDA-core "
                        "GEMV, not re-laid for the tensor-core one; +split: the tensor-core GEMV with split-K for "
                        "weights of few rows; +noact: the MLP's activation as its own kernel, not in the [gate | up] "
                        "GEMV's epilogue; +nocodes: attention reads a float copy of an int8 KV cache, not its codes; "
                        "+nokv8: an int8 KV cache quantized by the codec's PyTorch kernels, not one Triton kernel a "
                        "layer; +novector: the split-cache attention's tiles for one query row a key/value head, not "
                        "its one-row kernels; +mhasdpa: SDPA for one token of an MHA model at any cache length; "
                        "+nofold: the attention kernels decode an int8 cache's codes to the query's dtype, not apply "
                        "its scales to scores and probabilities; +oldplan: the attention's splits and one-row plans "
                        "as before session 38; +oldtiles: M <= 16 matmuls of 4-bit and wide 8-bit weights on the "
                        "tensor-core tiles of before session 39 (triton_backend.SMALL_M_TILES); +nolaid: the rows "
                        "mode reads x as stored, not its norms' copy in fragment order")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.user_path = not args.harness  # generate's path is what users get: the default (issue 13 item 2)
    args.batches = args.batches or ([1] if args.user_path else [1, 16])
    return args


def main() -> None:
    args = parse_args()
    began = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = "tiny" if args.tiny else args.shape
    if args.json is None:
        out = os.environ.get("OUT")
        stem = "decode_user" if args.user_path else "decode"
        args.json = Path(out) / f"{stem}_{'h100' if stem == 'decode' else 'gpu'}.json" if out else \
            ROOT / f"bench/results/{stem}.json"
    config = llama_config(shape)
    torch.manual_seed(0)
    model = random_llama(config, device)
    gen = torch.Generator(device=device).manual_seed(1)
    prompts = {b: torch.randint(0, config.vocab_size, (b, args.prompt), device=device, generator=gen)
               for b in args.batches}
    timer = Timer(device)
    meta = {"shape": shape, "config": SHAPES[shape], "weights": "RANDOM normal (std 0.02), norms 1",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": "bfloat16", "prompt_tokens": args.prompt, "decode_steps": args.steps,
            "repeats_eager": args.repeats, "repeats_graph": args.repeats + 2, "read_tbs": READ_TBS,
            "timing": "CUDA events, median over repeats of `steps` consecutive decode steps" if device.type == "cuda"
            else "perf_counter", "skipped": {}}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    print(f"{shape} with RANDOM weights on {meta['device']}; model built in {time.perf_counter() - began:.1f} s",
          file=sys.stderr, flush=True)

    candidates = [("bf16", lambda: model)]
    candidates += [(spec, (lambda s=spec: quantized_copy(model, s))) for spec in args.formats]
    if args.user_path:
        args.no_peers = True
        meta["mode"] = ("user path: modelpress.inference.decoding.generate at batch 1, "
                        "inference.batch_decode.generate_batch at more rows; greedy")
        meta["kv_cache_modes"], meta["paths"] = args.kv_cache, args.paths
    if not args.no_peers:
        for name, build in PEERS.items():
            if device.type != "cuda":
                meta["skipped"][name] = "CUDA only"
            elif name.startswith("bnb") and not _importable("bitsandbytes"):
                meta["skipped"][name] = "bitsandbytes not importable"
            else:
                candidates.append((name, (lambda b=build: peer_copy(model, b))))
    rows: list[dict] = []
    base: dict = {}
    for name, build in candidates:
        if time.perf_counter() - began > args.max_seconds:
            meta["skipped"][name] = f"time budget ({args.max_seconds:.0f} s) spent"
            continue
        t0 = time.perf_counter()
        try:
            candidate = build()
        except Exception as err:  # noqa: BLE001  (a peer that fails to build is skipped and named)
            meta["skipped"][name] = f"build failed: {type(err).__name__}: {err}"[:400]
            print(f"{name}: skipped ({meta['skipped'][name]})", file=sys.stderr, flush=True)
            continue
        built_s = time.perf_counter() - t0
        if args.user_path:
            new = measure_user_path(name, candidate, prompts, args, base,
                                    on_row=lambda done: write(args.json, meta, rows + done, began))
        else:
            new = measure(name, candidate, prompts, args, timer, device, base)
        for row in new:
            row["build_s"] = built_s
        rows += new
        print(f"{name}: built in {built_s:.1f} s, measured in {time.perf_counter() - t0 - built_s:.1f} s "
              f"({time.perf_counter() - began:.0f} s so far)", file=sys.stderr, flush=True)
        for row in new:
            if "graph_error" in row:
                print(f"  graph capture failed at batch {row['batch']}: {row['graph_error']}", file=sys.stderr)
        if candidate is not model:
            del candidate
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write(args.json, meta, rows, began)
    print(f"\n{shape}, RANDOM weights, {meta['device']}, torch {meta['torch']}; prompt {args.prompt}, "
          f"{args.steps} decode steps" + ("" if args.user_path else f"; floor = weight bytes / {READ_TBS} TB/s"))
    print(user_table(rows) if args.user_path else table(rows))
    for name, why in meta["skipped"].items():
        print(f"skipped {name}: {why}")
    write(args.json, meta, rows, began)
    print(f"JSON: {args.json}")


def _importable(module: str) -> bool:
    with contextlib.suppress(ImportError):
        __import__(module)
        return True
    return False


def write(path: Path, meta: dict, rows: list[dict], began: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "wall_s": time.perf_counter() - began}
    clean = [{k: v for k, v in r.items() if k != "tokens"} for r in rows]
    text = user_table(rows) if meta.get("mode", "").startswith("user") else table(rows)
    path.write_text(json.dumps({"meta": meta, "rows": clean, "table": text}, indent=1) + "\n")


if __name__ == "__main__":
    main()
