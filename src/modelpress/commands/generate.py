"""modelpress generate [MODEL] --prompt TEXT [--prompt TEXT ...] [--prompts-file FILE] [--batch-size N]
[--draft MODEL | --self-speculative FORMAT] [--kv-cache MODE]

Streams the new text to stdout as tokens are produced and prints tokens/s (and the draft acceptance rate)
to stderr at the end. Several prompts (--prompt more than once, or a --prompts-file of one a line) decode together
in batches of --batch-size (inference/batch_decode.py); each prompt's text is printed when its batch is done, after a
line "### prompt N". With a draft they decode speculatively one after another. Several prompts run in one
DecodeSession (inference/session.py): the model is prepared, and its CUDA graphs captured, once for all of them.
"""

from __future__ import annotations

import argparse
import sys

import torch

from modelpress.commands.common import add_json_argument, add_model_argument, positive_int, write_json
from modelpress.errors import ModelpressError
from modelpress.inference.batch_decode import BatchGenerationResult
from modelpress.inference.decoding import GenerationSettings, generate
from modelpress.inference.kv_cache import CACHE_MODES
from modelpress.inference.sampling import SamplingConfig
from modelpress.inference.session import DecodeSession
from modelpress.inference.speculative import SpeculativeConfig, low_bit_draft, speculative_generate
from modelpress.io.model import load_model
from modelpress.nn.cpu_native import PRODUCTS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (plain, speculative or self-speculative)")
    add_model_argument(p)
    p.add_argument("--prompt", action="append", default=[],
                   help="prompt text; give it several times to decode the prompts together as a batch")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="prompts one a line (empty lines skipped), decoded in batches of --batch-size")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="prompts decoded together at most, with several prompts (default 16)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template as a user turn")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens to generate at most (default 128)")
    add_sampling_arguments(p)
    p.add_argument("--kv-cache", default="float", choices=CACHE_MODES,
                   help="KV cache of the model (default float); a quantized one also takes the static, "
                        "graph-captured path on CUDA, and int8 the native decode step on the CPU")
    p.add_argument("--eager", action="store_true",
                   help="decode eagerly (DynamicCache, one Python-driven forward per token) instead of the default: "
                        "on CUDA a static KV cache with the decode step captured in a CUDA graph; on the CPU the whole "
                        "decode step in one native call (Llama/Mistral/Qwen2/Qwen3 decoders the native kernels serve)")
    p.add_argument("--compile", action="store_true",
                   help="decode on the static cache with its step run through torch.compile (on CUDA, then captured): "
                        "fewer, fused kernels per layer, after a first call that compiles (tens of seconds)")
    p.add_argument("--no-fuse", action="store_true",
                   help="on CUDA, decode without the decode-time fusions (by default each layer's q/k/v and gate/up "
                        "projections run as one matmul, and its RMS norms with the residual adds before them, rotary "
                        "embeddings, SiLU-times-up and cache writes as one kernel each, for the generation only)")
    p.add_argument("--cpu-products", default="bfloat16", choices=tuple(PRODUCTS),
                   help="the CPU's native decode step: what packed weights multiply with. bfloat16 (default): int4 x "
                        "rounded to bfloat16 (int16 in blocks of 32 on AVX2-only CPUs), int8 x to int16 in blocks of "
                        "32, other formats exact; float32: exact; int8: x quantized to int8 in blocks "
                        "of 32 for int4 and int8 weights, as llama.cpp does (faster where the CPU has AVX512_VNNI)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast a float model to this dtype")
    add_json_argument(p)
    p.set_defaults(func=run)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Sampling and speculative decoding: generate's and chat's."""
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens holding this mass")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    draft = p.add_mutually_exclusive_group()
    draft.add_argument("--draft", default=None, metavar="MODEL", help="speculative decoding with this draft model")
    draft.add_argument("--self-speculative", default=None, metavar="FORMAT",
                       help="speculative decoding with a low-bit RTN copy of the model as draft, e.g. int4/g128")
    p.add_argument("--draft-tokens", type=positive_int, default=4,
                   help="tokens the draft proposes per round (default 4)")


class StreamPrinter:
    """Writes newly decoded text as tokens arrive; holds back a trailing partial UTF-8 character."""

    def __init__(self, tokenizer, out=None) -> None:
        self.tokenizer, self.out = tokenizer, out if out is not None else sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, tokens: list[int]) -> None:
        self.ids += tokens
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelpressError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelpressError(f"device {name!r} was asked for but CUDA is not available")
    return device


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelpressError("--chat was given but the model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    found = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return tuple(sorted(found))


def load_draft(args: argparse.Namespace, target, tokenizer, device: torch.device, dtype):
    if args.self_speculative:
        from modelpress.formats.scheme import WeightScheme

        return low_bit_draft(target, WeightScheme.parse(args.self_speculative))
    draft = load_model(args.draft)
    same = draft.tokenizer is None or not hasattr(tokenizer, "get_vocab") or (
        draft.tokenizer.get_vocab() == tokenizer.get_vocab())
    if not same:
        raise ModelpressError(f"draft model {args.draft} has a different tokenizer vocabulary from the target; "
                              "speculative decoding needs the same tokenizer")
    model = draft.model.to(device)
    return model.to(dtype) if dtype is not None else model


def decode_path_of(args: argparse.Namespace, device: torch.device) -> str:
    """--eager: eager; --compile: the static cache (captured on CUDA), whose forward it compiles; else auto."""
    if args.eager and args.compile:
        raise ModelpressError("--compile compiles the static-cache decode step, which --eager turns off; drop one")
    if args.eager:
        return "eager"
    return "static" if args.compile and device.type != "cuda" else "auto"


def run(args: argparse.Namespace) -> int:
    args.prompt = list(args.prompt) + read_prompts(args.prompts_file)
    if not args.prompt:
        raise ModelpressError("give a prompt: --prompt TEXT (once or more) or --prompts-file FILE")
    device = resolve_device(args.device)
    decode = decode_path_of(args, device)
    dtype = DTYPES[args.dtype] if args.dtype else None
    loaded = load_model(args.model)
    if loaded.tokenizer is None:
        raise ModelpressError(f"model {loaded.source} has no tokenizer; generate needs one to read the prompt")
    model = loaded.model.to(device)
    model = model.to(dtype) if dtype is not None else model
    tokenizer = loaded.tokenizer
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, eos_token_ids=eos_ids(model, tokenizer),
                                  sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
                                  decode=decode, kv_cache=args.kv_cache,
                                  compile=args.compile, fuse=not args.no_fuse, cpu_products=args.cpu_products)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if (len(args.prompt) > 1 or args.prompts_file) and (args.draft or args.self_speculative):
        return run_speculative_prompts(args, loaded.source, model, tokenizer, settings, generator, device, dtype)
    if len(args.prompt) > 1 or args.prompts_file:
        return run_batch(args, loaded.source, model, tokenizer, settings, generator, device)
    ids = prompt_ids(tokenizer, args.prompt[0], args.chat)
    printer = StreamPrinter(tokenizer)
    # packed layers take the CPU kernels (bfloat16 inside, nn/cpu_backend.py): GenerationSettings.cpu_kernels
    if args.draft or args.self_speculative:
        draft = load_draft(args, model, tokenizer, device, dtype)
        # the target's KV cache follows settings.kv_cache on either path, as in generate
        result = speculative_generate(model, draft, ids, settings, SpeculativeConfig(args.draft_tokens),
                                      generator=generator, on_tokens=printer)
    else:
        # generate builds the cache for the path it takes: static (graph-captured on CUDA), native or eager
        result = generate(model, ids, settings, generator=generator, on_tokens=printer)
    sys.stdout.write("\n")
    summary = (f"{len(result.tokens)} tokens in {result.seconds:.2f} s: {result.tokens_per_s:.1f} tokens/s "
               f"({result.decode_path} path{', fused: ' + result.fusions if result.fusions else ''})")
    if result.acceptance_rate is not None:
        summary += (f", draft acceptance {result.acceptance_rate:.1%} over {result.rounds} rounds, "
                    f"{result.target_forwards} target passes"
                    f"{', the draft on the target KV cache' if result.shared_kv_cache else ''}")
    print(summary, file=sys.stderr)
    write_json(args.json, {**result.to_dict(), "text": printer.text(),
                           "draft": args.draft or (f"self:{args.self_speculative}" if args.self_speculative else None),
                           "draft_tokens": args.draft_tokens, **run_facts(args, loaded.source, device)})
    return 0


def run_facts(args: argparse.Namespace, source: str, device: torch.device) -> dict:
    """What every --json of this command records about the run: model, KV cache, device, sampling, seed."""
    return {"model": source, "kv_cache": args.kv_cache, "device": str(device), "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}


def read_prompts(path: str | None) -> list[str]:
    """--prompts-file's prompts: its non-empty lines."""
    if path is None:
        return []
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\r\n") for line in f if line.strip()]
    except OSError as err:
        raise ModelpressError(f"cannot read the prompts file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ModelpressError(f"the prompts file {path} is not UTF-8 text") from None
    if not prompts:
        raise ModelpressError(f"the prompts file {path} holds no prompt (one a line)")
    return prompts


def run_batch(args: argparse.Namespace, source: str, model, tokenizer, settings: GenerationSettings, generator,
              device: torch.device) -> int:
    """Several prompts: batches of --batch-size in one session, each prompt's text printed once its batch is
    done."""
    rows = [prompt_ids(tokenizer, prompt, args.chat) for prompt in args.prompt]
    results, texts = [], []
    with DecodeSession(model, settings, rows=min(args.batch_size, len(rows))) as session:
        for start in range(0, len(rows), args.batch_size):
            results.append(session.generate_rows(rows[start:start + args.batch_size], generator=generator))
            for i, new in enumerate(results[-1].tokens, start + 1):
                texts.append(tokenizer.decode(new, skip_special_tokens=True))
                sys.stdout.write(f"### prompt {i}\n{texts[-1]}\n")
            sys.stdout.flush()
    # a last batch of one prompt runs as one prompt: it does not make the run unbatched
    batched = all(r.batched or len(r.tokens) == 1 for r in results)
    total = BatchGenerationResult(
        tokens=[t for r in results for t in r.tokens], prompt_tokens=[len(r) for r in rows],
        seconds=sum(r.seconds for r in results), forwards=sum(r.forwards for r in results),
        decode_path=",".join(dict.fromkeys(r.decode_path for r in results)), batched=batched,
        capture_seconds=sum(r.capture_seconds for r in results), fusions=results[0].fusions)
    how = (f"{len(rows)} prompts in {len(results)} batch{'es' if len(results) > 1 else ''}" if batched
           else f"{len(rows)} prompts one at a time")
    print(f"{total.new_tokens} tokens in {total.seconds:.2f} s: {total.tokens_per_s:.1f} tokens/s ({how}, "
          f"{total.decode_path} path{', fused: ' + total.fusions if total.fusions else ''})", file=sys.stderr)
    write_json(args.json, {**total.to_dict(), "batch_size": args.batch_size, "texts": texts, "prompts": args.prompt,
                           **run_facts(args, source, device)})
    return 0


def run_speculative_prompts(args: argparse.Namespace, source: str, model, tokenizer, settings: GenerationSettings,
                            generator, device: torch.device, dtype) -> int:
    """Several prompts with a draft: speculative decoding of each in turn, in one session (the draft made once);
    each prompt's text printed when it is done."""
    draft = load_draft(args, model, tokenizer, device, dtype)
    results, texts = [], []
    with DecodeSession(model, settings, draft=draft, speculative=SpeculativeConfig(args.draft_tokens)) as session:
        for i, prompt in enumerate(args.prompt, 1):
            results.append(session.generate(prompt_ids(tokenizer, prompt, args.chat), generator=generator))
            texts.append(tokenizer.decode(results[-1].tokens, skip_special_tokens=True))
            sys.stdout.write(f"### prompt {i}\n{texts[-1]}\n")
            sys.stdout.flush()
    tokens, seconds = sum(len(r.tokens) for r in results), sum(r.seconds for r in results)
    drafted, accepted = sum(r.drafted for r in results), sum(r.accepted for r in results)
    paths = ",".join(dict.fromkeys(r.decode_path for r in results))
    print(f"{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s ({len(results)} prompts one after "
          f"another, {paths} path{', fused: ' + results[0].fusions if results[0].fusions else ''}), draft acceptance "
          f"{accepted / max(drafted, 1):.1%} over {sum(r.rounds for r in results)} rounds", file=sys.stderr)
    write_json(args.json, {"new_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                           "decode_path": paths, "acceptance_rate": accepted / max(drafted, 1),
                           "capture_seconds": sum(r.capture_seconds for r in results),
                           "runs": [r.to_dict() for r in results], "texts": texts, "prompts": args.prompt,
                           "draft": args.draft or f"self:{args.self_speculative}", "draft_tokens": args.draft_tokens,
                           **run_facts(args, source, device)})
    return 0
