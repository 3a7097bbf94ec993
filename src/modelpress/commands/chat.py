"""modelpress chat [MODEL] [--system TEXT] [--max-new-tokens N] [--temperature T] [--kv-cache MODE]
[--draft MODEL | --self-speculative FORMAT]

A conversation with the model: each line of stdin is a user message, and the reply streams to stdout (a terminal
gets a "> " prompt on stderr). Every turn's prompt is the whole conversation so far, in the tokenizer's chat
template (a model without one gets "User:" / "Assistant:" lines, and a note on stderr). The turns run in one
DecodeSession (inference/session.py): the model is prepared once, and the part of a turn's prompt that the cache
holds from the turn before (the conversation up to the last reply) is not run again, so a turn costs its new message
and its reply, not the whole conversation; with a draft, speculatively, the draft's cache kept as well. A
conversation that would outgrow the model's context drops its oldest exchanges (the system message stays) and says
so. "/reset" starts a new conversation; "/exit", the end of input or Ctrl-C at the prompt ends it; Ctrl-C during a
reply stops that reply.

stderr gets one line a turn: tokens/s, and how many prompt tokens the cache held. --json: every turn's figures.
"""

from __future__ import annotations

import argparse
import sys

import torch

from modelpress.commands.common import add_json_argument, add_model_argument, positive_int, write_json
from modelpress.commands.generate import (DTYPES, StreamPrinter, add_sampling_arguments, decode_path_of, eos_ids,
                                         load_draft, resolve_device)
from modelpress.errors import ModelpressError
from modelpress.inference.decoding import GenerationSettings
from modelpress.inference.kv_cache import CACHE_MODES
from modelpress.inference.sampling import SamplingConfig
from modelpress.inference.session import DecodeSession
from modelpress.inference.speculative import SpeculativeConfig
from modelpress.io.model import load_model
from modelpress.nn.cpu_native import PRODUCTS


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="a conversation with the model on stdin/stdout, each turn reusing the cache")
    add_model_argument(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message that opens the conversation")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="a reply's tokens at most (default 256)")
    add_sampling_arguments(p)
    p.add_argument("--kv-cache", default="float", choices=CACHE_MODES,
                   help="KV cache of the model (default float); KIVI modes (int4, int2) re-quantize old positions, so "
                        "each turn then runs its whole prompt")
    p.add_argument("--eager", action="store_true", help="decode eagerly (no static cache, no native step, no reuse)")
    p.add_argument("--compile", action="store_true", help="the static cache's step through torch.compile")
    p.add_argument("--no-fuse", action="store_true", help="on CUDA, decode without the decode-time fusions")
    p.add_argument("--cpu-products", default="bfloat16", choices=tuple(PRODUCTS),
                   help="what packed weights multiply with in the CPU's native step (see modelpress generate)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast a float model to this dtype")
    add_json_argument(p)
    p.set_defaults(func=run)


class Conversation:
    """The messages so far, as the token ids of a prompt that asks for the next reply."""

    def __init__(self, tokenizer, system: str | None, context: int | None) -> None:
        self.tokenizer, self.system, self.context = tokenizer, system, context
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.messages: list[dict[str, str]] = []

    def reset(self) -> None:
        self.messages = []

    def ids(self) -> list[int]:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        if self.templated:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        names = {"system": "System", "user": "User", "assistant": "Assistant"}
        text = "".join(f"{names[m['role']]}: {m['content']}\n" for m in messages) + "Assistant:"
        return list(self.tokenizer(text)["input_ids"])

    def prompt(self, reply_tokens: int) -> tuple[list[int], int]:
        """The prompt for the next reply and how many exchanges were dropped so that it and `reply_tokens` fit the
        context: the oldest first, never the message being answered."""
        dropped = 0
        while True:
            ids = self.ids()
            if self.context is None or len(ids) + reply_tokens <= self.context:
                return ids, dropped
            if len(self.messages) <= 1:
                raise ModelpressError(f"the message takes {len(ids)} tokens; with a reply of {reply_tokens} it does "
                                      f"not fit the model's context of {self.context} (lower --max-new-tokens)")
            del self.messages[:2]   # the oldest user message and its reply
            dropped += 1


def messages_from(stream, interactive: bool):
    """The user's lines: stripped, empty ones skipped, until "/exit" or the end of input."""
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = stream.readline()
        except KeyboardInterrupt:   # Ctrl-C at the prompt ends the conversation, as the end of input does
            return
        if not line or line.strip() == "/exit":
            return
        if line.strip():
            yield line.strip()


def acceptance(result) -> str:
    return "" if result.acceptance_rate is None else f", draft acceptance {result.acceptance_rate:.1%}"


def context_of(model) -> int | None:
    n = getattr(model.config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    decode = decode_path_of(args, device)
    loaded = load_model(args.model)
    if loaded.tokenizer is None:
        raise ModelpressError(f"model {loaded.source} has no tokenizer; chat needs one")
    model = loaded.model.to(device)
    model = model.to(DTYPES[args.dtype]) if args.dtype else model
    tokenizer = loaded.tokenizer
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, eos_token_ids=eos_ids(model, tokenizer),
                                  sampling=SamplingConfig(args.temperature, args.top_k, args.top_p), decode=decode,
                                  kv_cache=args.kv_cache, compile=args.compile, fuse=not args.no_fuse,
                                  cpu_products=args.cpu_products)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    conversation = Conversation(tokenizer, args.system, context_of(model))
    if not conversation.templated:
        print("the model's tokenizer has no chat template: the conversation is written as 'User:' / 'Assistant:' "
              "lines", file=sys.stderr)
    turns = []
    draft = load_draft(args, model, tokenizer, device, DTYPES[args.dtype] if args.dtype else None) if (
        args.draft or args.self_speculative) else None
    speculative = SpeculativeConfig(args.draft_tokens) if draft is not None else None
    with DecodeSession(model, settings, draft=draft, speculative=speculative) as session:
        for message in messages_from(sys.stdin, sys.stdin.isatty()):
            if message == "/reset":
                conversation.reset()
                print("(a new conversation)", file=sys.stderr)
                continue
            conversation.messages.append({"role": "user", "content": message})
            ids, dropped = conversation.prompt(args.max_new_tokens)
            if dropped:
                print(f"(the {dropped} oldest exchange{'s' if dropped > 1 else ''} dropped to fit the context of "
                      f"{conversation.context} tokens)", file=sys.stderr)
            printer = StreamPrinter(tokenizer)
            try:
                result = session.generate(ids, generator=generator, on_tokens=printer)
            except KeyboardInterrupt:   # Ctrl-C during a reply stops it; what was said so far stays in the conversation
                sys.stdout.write("\n")
                print("(reply interrupted)", file=sys.stderr)
                conversation.messages.append({"role": "assistant", "content": printer.text().strip()})
                turns.append({"message": message, "reply": printer.text(), "dropped": dropped, "interrupted": True})
                continue
            sys.stdout.write("\n")
            sys.stdout.flush()
            conversation.messages.append({"role": "assistant", "content": printer.text().strip()})
            print(f"{len(result.tokens)} tokens in {result.seconds:.2f} s: {result.tokens_per_s:.1f} tokens/s; "
                  f"prompt {result.prompt_tokens} tokens, {result.reused_prompt_tokens} held from the turn before "
                  f"({result.decode_path} path{acceptance(result)})", file=sys.stderr)
            turns.append({**result.to_dict(), "message": message, "reply": printer.text(), "dropped": dropped})
    write_json(args.json, {"model": loaded.source, "device": str(device), "kv_cache": args.kv_cache,
                           "draft": args.draft or (f"self:{args.self_speculative}" if args.self_speculative else None),
                           "temperature": args.temperature, "seed": args.seed, "templated": conversation.templated,
                           "system": args.system, "turns": turns})
    return 0
