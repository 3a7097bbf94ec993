"""What a BOS at the start of every evaluation window does to perplexity, on a model trained with one.

A tiny Llama (from a config) is trained briefly on the default corpus with a character tokenizer whose
post-processor adds <s>, every training window being [<s>] + text (as llama.cpp and most Llama-style
training pipelines see it). It is then scored on held-out windows cut both ways by io/text.py:
with BOS (the default when the tokenizer adds one) and without (`--no-bos`), under both scoring rules.

    PYTHONPATH=src python bench/bos_effect.py --json bench/results/bos_effect.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from modelpress.eval.quality import evaluate_quality
from modelpress.io.text import TextSource, default_corpus, make_windows, tokenizer_bos


def bos_char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(config)


def train(model, windows: torch.Tensor, steps: int, batch: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(steps):
        ids = windows[torch.randint(0, windows.shape[0], (batch,), generator=gen)]
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = bos_char_tokenizer()
    bos = tokenizer_bos(tok)
    source = TextSource("default corpus (first 400k chars)", default_corpus()[:400_000])
    cut = {use: make_windows(tok, source, args.seq_len, args.eval_windows, 4000, bos if use else None)
           for use in (True, False)}
    model = tiny_llama(len(tok))
    start = time.perf_counter()
    losses = train(model, cut[True].calibration, args.steps, batch=16)   # BOS at position 0 of every window
    seconds = time.perf_counter() - start
    model.eval()
    rows = []
    for use in (True, False):
        for score in ("all", "second-half"):
            q = evaluate_quality({"m": model}, cut[use].eval, batch_size=8, score=score)["m"]
            rows.append({"bos": use, "score": score, "perplexity": q.perplexity, "scored_tokens": q.scored_tokens})
    print(f"trained {args.steps} steps in {seconds:.0f} s, last loss {sum(losses[-20:]) / 20:.3f}")
    print("| windows | score | PPL | scored tokens |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {'[BOS] + text' if r['bos'] else 'text only'} | {r['score']} | {r['perplexity']:.3f} | {r['scored_tokens']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "seq_len": args.seq_len, "train_seconds": seconds,
                                               "final_loss": sum(losses[-20:]) / 20, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
