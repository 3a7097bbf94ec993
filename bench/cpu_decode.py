"""Benchmark: batch-1 greedy decode and prefill speed of the default model on the CPU, float vs quantized.

Every model is timed in the same process, round-robin (one repeat of each model per round), and reported
as the median over rounds, so that load from other work on a shared machine hits all rows alike: compare
the ratios, not the absolute numbers. Rows:
- float32                 the float model (F.linear in float32; its head is float in every row)
- SCHEME                  round-to-nearest quantized linear layers on the CPU backend (nn/cpu_backend.py)
- SCHEME reference        the same model with that backend disabled (dequantize, then F.linear), --reference
                          (float32 models only: the slowest rows)
- SCHEME + head HEAD      the output head quantized too, to HEAD (RTN leaves it float): --head HEAD, or --head
                          alone for the row's own scheme; --head int8/g32 is the Q8_0 head of the llama.cpp rows
- ... bf16                the model cast to bfloat16 first (activations bf16 throughout), --bf16
- llama.cpp TYPE (SCHEME) the SCHEME row exported to GGUF (losslessly: int4 -> Q4_0, int4-asym -> Q4_1, int8 ->
                          Q8_0; its tied head is Q8_0 as in the source GGUF) and run by llama.cpp itself
                          (modelpress-decode, scripts/llamacpp/decode.cpp: its C API, greedy, batch 1) with the
                          same prompts and thread count, in the same rounds, --llamacpp (needs
                          `bash scripts/install_llamacpp.sh`)
Decode is timed in `modelpress generate`'s loop from the first new token to the last, as llama.cpp's rows are
(--decode-loop transformers: model.generate, the prefill included, as in the tables before 2026-12-04).
Each thread count given to --threads gets its own full run (on a machine shared with other work, two
OpenMP threads can lose whole scheduler slices at every parallel region; one thread shows the kernels alone).
- SCHEME (PyTorch kernels) the same model with decode-sized calls on PyTorch's packed kernels instead of the native
                          ones (nn/cpu_native.py), on the eager path, --torch-kernels
- SCHEME int8 x           the same model on the native step with x quantized to int8 in blocks of 32 for int4 and
                          int8 weights (GenerationSettings.cpu_products="int8"), --int8-products
- SCHEME eager            the same model on generate's eager path (transformers' forward per token, the native
                          kernels per layer), --eager; the plain rows decode on generate's default CPU path: the
                          whole step in one native call (inference/native_decode.py) where it serves the model
- SCHEME + int8 KV         the same model decoding on an int8 KV cache (GenerationSettings.kv_cache="int8": the
                          native step's codes, or with --eager also the eager path's QuantizedKVCache), --kv-int8
Quality of the fast path is checked against the reference path of the same model on the first 128 tokens of the
prefill prompt, the fast path fed one token at a time (the decode calls generation makes), the reference 32 at a
time: top-1 agreement, max |logit difference|, KL(reference || fast), and whether greedy decode made the same
tokens.

    .venv/bin/python bench/cpu_decode.py --json bench/results/cpu_decode.json
    .venv/bin/python bench/cpu_decode.py --reference --head --bf16 --threads 2 1     # everything
    .venv/bin/python bench/cpu_decode.py --schemes int4/g32 int8/g32 --llamacpp --threads 2 1   # against llama.cpp
    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_decode.py --schemes int4/g32 int8/g32 nf4/g64 --head int8/g32 \
        --llamacpp --torch-kernels --threads 1    # native kernels against PyTorch's and llama.cpp
    OMP_NUM_THREADS=2 .venv/bin/python bench/cpu_decode.py --schemes int4/g32 int8/g32 nf4/g64 --head int8/g32 \
        --llamacpp --eager --int8-products --threads 1 2 --repeats 5   # the native step, eager, llama.cpp
    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_decode.py --schemes int4/g32 int8/g32 --head int8/g32 --llamacpp \
        --threads 1 --repeats 3 --decode-prompt 1024 --prefill-tokens 1024   # decode after a 1024-token context
    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_decode.py --schemes int4/g32 --head int8/g32 --kv-int8 --eager \
        --threads 1 --repeats 3 --decode-prompt 2048 --prefill-tokens 2048   # the int8 KV cache at a long context
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.formats.scheme import WeightScheme
from modelpress.inference.decoding import GenerationSettings, generate
from modelpress.inference.native_decode import NativeDecoder
from modelpress.inference.sampling import SamplingConfig
from modelpress.io.model import load_model
from modelpress.io.text import default_corpus
from modelpress.nn.cpu_backend import CPU_BACKEND, prepared_nbytes
from modelpress.nn.quant_linear import QuantLinear

DEFAULT_SCHEMES = ("int8/channel", "int4/g128", "int4-asym/g32")
DECODE_PROMPT_TOKENS = 16


@dataclass
class Row:
    name: str
    model: nn.Module | None
    fast: bool = True                      # False: the CPU backend is disabled for this row
    gguf: Path | None = None               # a llama.cpp row: the GGUF it runs (model is None)
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)  # seconds per generated token, one per round
    tokens: torch.Tensor | None = None     # greedy tokens of the last round
    compiled: bool = False                 # decode on the static cache with GenerationSettings.compile
    native: bool = True                    # False: decode-sized calls on PyTorch's kernels, not the native ones
    decode: str = "auto"                   # generate's decode path: auto (native where it serves), or eager
    decode_path: str = ""                  # the path the last round ran
    products: str = "bfloat16"             # GenerationSettings.cpu_products (the native step's products)
    kv_cache: str = "float"                # GenerationSettings.kv_cache

    @contextlib.contextmanager
    def context(self):
        before, CPU_BACKEND.native = CPU_BACKEND.native, self.native
        try:
            with CPU_BACKEND.fast() if self.fast else CPU_BACKEND.disabled():
                yield
        finally:
            CPU_BACKEND.native = before


def time_prefill(model: nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def time_decode(model: nn.Module, ids: torch.Tensor, new_tokens: int, loop: str, compiled: bool = False,
                decode: str = "auto", products: str = "bfloat16", kv_cache: str = "float"
                ) -> tuple[float, torch.Tensor, str]:
    """(seconds per token, greedy tokens, decode path). loop "modelpress": `modelpress generate`'s loop
    (inference.decoding, on `decode`'s path: auto is the native step where it serves the model; compiled: the
    static path with GenerationSettings.compile), timed from the first new token to the last as llama.cpp's rows
    are (prefill excluded); "transformers": model.generate, the whole call over the new tokens (prefill
    included)."""
    if loop == "modelpress" or compiled:
        stamps: list[float] = []
        settings = GenerationSettings(max_new_tokens=new_tokens, sampling=SamplingConfig(temperature=0.0),
                                      decode="static" if compiled else decode, compile=compiled,
                                      cpu_kernels=CPU_BACKEND.enabled, cpu_products=products, kv_cache=kv_cache)
        result = generate(model, ids, settings,
                          on_tokens=lambda _: stamps.append(time.perf_counter()))
        return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1), torch.tensor(result.tokens), result.decode_path
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    made = out.shape[1] - ids.shape[1]
    return (time.perf_counter() - start) / max(made, 1), out[0, ids.shape[1]:], "transformers"


def layer_bytes(model: nn.Module) -> dict:
    """Bytes of the quantized linear layers: as stored (packed), as prepared for the CPU kernels, as float32."""
    packed = prepared = floats = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            packed += module.weight_nbytes
            prep = CPU_BACKEND.prepared(module.packed)
            prepared += 0 if prep is None else prepared_nbytes(prep)
            floats += 4 * module.in_features * module.out_features
    return {"packed_bytes": packed, "prepared_bytes": prepared, "float32_bytes": floats}


QUALITY_CHUNK = 32  # prompt tokens per forward in the quality check: a call size every CPU layout serves
QUALITY_TOKENS = 128  # the fast path's logits are taken one token at a time (decode calls, as generation makes)


def chunked_logits(model: nn.Module, ids: torch.Tensor, chunk: int = QUALITY_CHUNK) -> torch.Tensor:
    """(T, vocab) float64 logits of ids (1, T), fed `chunk` tokens at a time with a KV cache."""
    cache, logits = None, []
    for start in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[0].double())
    return torch.cat(logits)


@torch.no_grad()
def fast_vs_reference(row: Row, ids: torch.Tensor) -> dict:
    """The row's fast path fed one token at a time (the decode-sized calls generation makes; the native step where
    the row decoded on it) against the reference path, over the first QUALITY_TOKENS tokens of the prompt."""
    ids = ids[:, :QUALITY_TOKENS]
    with row.context():
        if row.decode_path == "native":   # the native step, as generation ran it (the first token prefilled)
            native = NativeDecoder(row.model, ids.shape[1], products=row.products, kv_cache=row.kv_cache)
            first = native.prefill(ids[0, :1].tolist())
            fast = torch.cat([first] + [native.step(int(t)) for t in ids[0, 1:]]).double()
        else:
            fast = chunked_logits(row.model, ids, chunk=1)
    with CPU_BACKEND.disabled():
        ref = chunked_logits(row.model, ids)
    kl = (F.softmax(ref, -1) * (F.log_softmax(ref, -1) - F.log_softmax(fast, -1))).sum(-1)
    return {"top1_agreement": (fast.argmax(-1) == ref.argmax(-1)).double().mean().item(),
            "max_abs_logit_diff": (fast - ref).abs().max().item(),
            "mean_kl_ref_fast": kl.mean().item()}


def quantize_head(model: nn.Module, scheme: WeightScheme) -> None:
    """Also quantize the output head (RTN skips it) as `quantize --head` does: the tied embedding becomes a
    QuantEmbedding over the same packed table. Shows what the float head costs each decode step."""
    from modelpress.algorithms.quantize.head import HeadConfig
    from modelpress.algorithms.quantize.head import quantize_head as quantize_output_head

    quantize_output_head(model, HeadConfig(scheme))


def build_rows(model: nn.Module, schemes: list[str], reference: bool, bf16: bool, head: str | None) -> list[Row]:
    """head: None (float head only), "same" (each row's scheme) or a scheme for every row's head."""
    rows = []
    for dtype in [torch.float32] + ([torch.bfloat16] if bf16 else []):
        suffix = "" if dtype == torch.float32 else " bf16"
        base = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        rows.append(Row("float32" if not suffix else "float bf16", base))
        for spec in schemes:
            scheme = WeightScheme.parse(spec)
            quantized = copy.deepcopy(base)
            quantize_rtn(quantized, RTNConfig(scheme))
            rows.append(Row(spec + suffix, quantized))
            if reference and dtype == torch.float32:
                rows.append(Row(f"{spec} reference", quantized, fast=False))
            if head is not None:
                head_scheme = scheme if head == "same" else WeightScheme.parse(head)
                with_head = copy.deepcopy(quantized)
                quantize_head(with_head, head_scheme)
                rows.append(Row(f"{spec}{suffix} + head {head_scheme.spec}", with_head))
    return rows


def llamacpp_rows(rows: list[Row], loaded, workdir: Path) -> list[Row]:
    """Each fast float32 scheme row exported to GGUF; only lossless exports (the same weights) make a row."""
    from modelpress.export import export_model
    from modelpress.io.model import LoadedModel

    made = []
    for row in rows:
        if not row.fast or row.name == "float32" or " " in row.name:
            continue
        out = workdir / row.name.replace("/", "-")
        result = export_model(LoadedModel(row.model, loaded.tokenizer, source=loaded.source,
                                          float_source=loaded.source), ["gguf"], out)[0]
        if not result.lossless:
            print(f"{row.name}: its GGUF is not lossless, no llama.cpp row", file=sys.stderr)
            continue
        types = result.notes[0].split(";")[0].removeprefix("linear layers: ")
        made.append(Row(f"llama.cpp {types} ({row.name})", None, gguf=out / "gguf" / "model.gguf"))
    return made


def time_llamacpp(row: Row, prompt: torch.Tensor, new_tokens: int) -> None:
    from modelpress.export import llamacpp

    threads = torch.get_num_threads()
    prefill, _, _ = llamacpp.decode(row.gguf, prompt[0], 1, threads)
    _, per_token, tokens = llamacpp.decode(row.gguf, prompt[0, :DECODE_PROMPT_TOKENS], new_tokens, threads)
    row.prefill_s.append(prefill)
    row.decode_s.append(per_token)
    row.tokens = torch.tensor(tokens)


@torch.no_grad()
def time_rows(rows: list[Row], prompt: torch.Tensor, new_tokens: int, repeats: int, reference_tokens: int,
              loop: str) -> None:
    """Fill each row's timings: `repeats` rounds, every row once per round (reference rows decode fewer tokens:
    the rate per token is what is compared)."""
    decode_prompt = prompt[:, :DECODE_PROMPT_TOKENS]
    for row in rows:
        row.prefill_s, row.decode_s = [], []
        if row.gguf is not None:
            time_llamacpp(row, prompt, 2)   # warm-up: the file in the page cache
            row.prefill_s, row.decode_s = [], []
            continue
        with row.context():  # warm-up: builds the prepared weights, touches every page once
            time_prefill(row.model, prompt)
            time_decode(row.model, decode_prompt, 2, loop, row.compiled, row.decode, row.products,  # compiles
                        row.kv_cache)
    for round_ in range(repeats):
        for row in rows:
            if row.gguf is not None:
                time_llamacpp(row, prompt, new_tokens)
                continue
            with row.context():
                row.prefill_s.append(time_prefill(row.model, prompt))
                tokens = new_tokens if row.fast else min(new_tokens, reference_tokens)
                per_token, row.tokens, row.decode_path = time_decode(row.model, decode_prompt, tokens, loop,
                                                                     row.compiled, row.decode, row.products,
                                                                     row.kv_cache)
                row.decode_s.append(per_token)
        print(f"{torch.get_num_threads()} threads: round {round_ + 1}/{repeats} done", file=sys.stderr, flush=True)


def row_quality(row: Row, rows: list[Row], prompt: torch.Tensor, new_tokens: int, loop: str) -> dict:
    quality = fast_vs_reference(row, prompt)
    reference = next((r for r in rows if r.model is row.model and not r.fast), None)
    if reference is None:
        with CPU_BACKEND.disabled(), torch.no_grad():
            _, reference_tokens, _ = time_decode(row.model, prompt[:, :DECODE_PROMPT_TOKENS], new_tokens, loop)
    else:
        reference_tokens = reference.tokens
    common = min(row.tokens.numel(), reference_tokens.numel())
    quality["greedy_tokens"] = common
    quality["greedy_tokens_equal"] = int((row.tokens[:common] == reference_tokens[:common]).sum())
    return quality


def markdown(results: list[dict]) -> str:
    base = results[0]
    lines = [("| threads | model | decode path | decode tok/s | vs float32 | prefill tok/s | vs float32 "
              "| quantized layers MB (packed / prepared) | fast vs reference: top-1, max dlogit, same greedy tokens |"),
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        base = r if r["name"] == "float32" else base
        size = "" if r["packed_bytes"] is None else f"{r['packed_bytes'] / 1e6:.1f} / {r['prepared_bytes'] / 1e6:.1f}"
        q = r.get("quality")
        quality = "" if q is None else (f"{q['top1_agreement']:.4f}, {q['max_abs_logit_diff']:.3f}, "
                                        f"{q['greedy_tokens_equal']}/{q['greedy_tokens']}")
        rate = r["decode_tokens_per_s"]
        lines.append(f"| {r['threads']} | {r['name']} | {r['decode_path'] or 'llama.cpp'} | "
                     f"{rate:.2f} | {rate / base['decode_tokens_per_s']:.2f}x | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x | {size} | {quality} |")
    return "\n".join(lines)


def main() -> None:
    global DECODE_PROMPT_TOKENS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemes", nargs="+", default=list(DEFAULT_SCHEMES))
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="one full run per thread count")
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--decode-prompt", type=int, default=DECODE_PROMPT_TOKENS,
                        help="tokens of context before decode is timed (every row, llama.cpp's too): 16, or e.g. 1024 "
                             "to time decode at a long context (the prefill prompt grows to at least this)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference", action="store_true", help="also time each quantized model on the reference path")
    parser.add_argument("--reference-tokens", type=int, default=8, help="tokens decoded per reference-row repeat")
    parser.add_argument("--bf16", action="store_true", help="also time bfloat16 copies of every model")
    parser.add_argument("--head", nargs="?", const="same", default=None, metavar="SCHEME",
                        help="also time each scheme with the output head quantized, to SCHEME (default: the row's)")
    parser.add_argument("--llamacpp", action="store_true",
                        help="also run each scheme's lossless GGUF export in llama.cpp (same prompts and threads)")
    parser.add_argument("--decode-loop", choices=("modelpress", "transformers"), default="modelpress",
                        help="modelpress: `modelpress generate`'s loop, prefill excluded as in llama.cpp's rows "
                             "(default); transformers: model.generate, prefill included (the tables before 2026-12-04)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each fast float32 row decoding on the static cache through torch.compile "
                             "(GenerationSettings.compile; compiled during the warm-up, tens of seconds per model)")
    parser.add_argument("--eager", action="store_true",
                        help="also time each fast float32 row on generate's eager path (transformers' forward per "
                             "token, the CPU default before the native step)")
    parser.add_argument("--int8-products", action="store_true",
                        help="also time each fast float32 quantized row on the native step with int8 x "
                             "(GenerationSettings.cpu_products='int8', as llama.cpp's CPU matmuls)")
    parser.add_argument("--torch-kernels", action="store_true",
                        help="also time each fast float32 quantized row with decode-sized calls on PyTorch's kernels "
                             "instead of the native ones (CpuBackend.native = False)")
    parser.add_argument("--kv-int8", action="store_true",
                        help="also decode every native row on an int8 KV cache (with --eager, its eager rows too)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    loaded = load_model(None)
    DECODE_PROMPT_TOKENS = args.decode_prompt
    ids = torch.tensor(loaded.tokenizer(default_corpus(), add_special_tokens=False)["input_ids"][
        : max(args.prefill_tokens, args.decode_prompt)])
    prompt = ids[None]
    rows = build_rows(loaded.model.eval(), args.schemes, args.reference, args.bf16, args.head)
    if args.torch_kernels:   # on the eager path: the native step always takes the native kernels
        rows += [Row(f"{row.name} (PyTorch kernels)", row.model, native=False, decode="eager") for row in rows
                 if row.fast and row.name != "float32" and next(row.model.parameters()).dtype == torch.float32]
    if args.int8_products:
        rows += [Row(f"{row.name} int8 x", row.model, products="int8") for row in rows
                 if row.fast and row.name != "float32" and row.decode == "auto" and row.native
                 and next(row.model.parameters()).dtype == torch.float32]
    if args.kv_int8:
        rows += [Row(f"{row.name} + int8 KV", row.model, kv_cache="int8") for row in rows
                 if row.fast and row.native and row.decode == "auto" and row.products == "bfloat16"
                 and next(row.model.parameters()).dtype == torch.float32]
    if args.eager:
        rows += [Row(f"{row.name} eager", row.model, decode="eager", kv_cache=row.kv_cache) for row in rows
                 if row.fast and row.native and row.decode == "auto" and row.products == "bfloat16"
                 and next(row.model.parameters()).dtype == torch.float32]
    if args.compile:
        rows += [Row(f"{row.name} compiled", row.model, compiled=True) for row in rows
                 if row.fast and row.native and next(row.model.parameters()).dtype == torch.float32]
    workdir = Path(tempfile.mkdtemp(prefix="modelpress-cpu-decode-"))
    if args.llamacpp:
        rows += llamacpp_rows(rows, loaded, workdir)

    results, load = [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        load.append(os.getloadavg()[0])
        time_rows(rows, prompt, args.new_tokens, args.repeats, args.reference_tokens, args.decode_loop)
        load.append(os.getloadavg()[0])
        for row in rows:
            results.append({"threads": threads, "name": row.name, "fast_path": row.fast, "decode_path": row.decode_path,
                            "cpu_products": row.products, "kv_cache": row.kv_cache,
                            "decode_tokens_per_s": 1 / statistics.median(row.decode_s), "native_kernels": row.native,
                            "prefill_tokens_per_s": prompt.shape[1] / statistics.median(row.prefill_s),
                            "decode_s_per_token": row.decode_s, "prefill_s": row.prefill_s,
                            "packed_bytes": None, "prepared_bytes": None, "float32_bytes": None})
            if row.gguf is not None:
                mine = next(r for r in rows if row.name.endswith(f"({r.name})"))
                common = min(row.tokens.numel(), mine.tokens.numel())
                results[-1]["greedy_tokens_equal_to_ours"] = [int((row.tokens[:common] == mine.tokens[:common]).sum()),
                                                              common]
            elif any(isinstance(m, QuantLinear) for m in row.model.modules()):
                results[-1].update(layer_bytes(row.model))
                if row.fast and not row.compiled and (row.kv_cache == "float" or row.decode_path == "native"):
                    results[-1]["quality"] = row_quality(row, rows, prompt, args.new_tokens, args.decode_loop)

    shutil.rmtree(workdir, ignore_errors=True)
    table = markdown(results)
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
                "load_average_1min_before_after": load, "prefill_tokens": prompt.shape[1],
                "decode_prompt_tokens": DECODE_PROMPT_TOKENS, "new_tokens": args.new_tokens, "repeats": args.repeats,
                "reference_tokens": args.reference_tokens, "decode_loop": args.decode_loop,
                "kernel_calls": dict(CPU_BACKEND.calls)}
        args.json.write_text(json.dumps({"meta": meta, "results": results, "table": table}, indent=1))


if __name__ == "__main__":
    main()
