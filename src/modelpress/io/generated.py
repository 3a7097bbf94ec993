"""Calibration windows the model writes itself (`--calib-text generated`).

A calibration corpus is one domain; the text users deploy on is another, and a GPTQ Hessian or an AWQ scale
fitted on the first puts rounding error where the second needs precision (docs/cross_domain.md). Text
sampled from the float model is drawn from the distribution the model learnt, over every domain it knows,
in proportion to how it weighs them: no corpus needs to be chosen, and no text leaves the machine.

Each window starts from the model's document-start token (the BOS the tokenizer adds, else its BOS or EOS
token, which pretraining puts between documents) and is sampled one token at a time with a KV cache, at
temperature `temperature` (1.0: the model's own distribution). A sampled end-of-text token is kept, and the
next document follows it, as in pretraining's packed windows. Sampling is seeded: the same model, seed, sizes,
batch size and device give the same windows.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from modelpress.errors import ModelpressError

log = logging.getLogger(__name__)

GENERATED = "generated"


def start_token(tokenizer) -> int:
    """The token a generated window starts from: the BOS the tokenizer adds, else its BOS, else its EOS."""
    from modelpress.io.text import tokenizer_bos

    for token in (tokenizer_bos(tokenizer), getattr(tokenizer, "bos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if token is not None:
            return int(token)
    raise ModelpressError("calibration text 'generated' starts each window from the tokenizer's BOS or EOS "
                          "token, and this tokenizer has neither; give a calibration text instead")


@torch.no_grad()
def generated_windows(model: nn.Module, tokenizer, samples: int, seq_len: int, seed: int = 0,
                      temperature: float = 1.0, batch_size: int | None = None,
                      device: str | torch.device | None = None) -> torch.Tensor:
    """(samples, seq_len) token ids sampled from `model` (a causal LM taking `input_ids`, returning `.logits`),
    `batch_size` windows at a time (default 16 on the CPU, 128 on a GPU), on `device` (default: where the
    model is; the model goes back after)."""
    if samples <= 0 or seq_len < 2:
        raise ModelpressError(f"generated calibration needs at least one window of 2 tokens, got {samples} x {seq_len}")
    if temperature <= 0:
        raise ModelpressError(f"sampling temperature must be positive, got {temperature}")
    home = next(model.parameters()).device
    if any(p.is_meta for p in model.parameters()):
        raise ModelpressError("calibration text 'generated' samples from the whole model, and this one is streamed "
                              "from disk block by block (--stream); give a calibration text instead")
    device = home if device is None else torch.device(device)
    batch_size = batch_size or (16 if device.type == "cpu" else 128)
    first = start_token(tokenizer)
    was_training = model.training
    model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = []
    try:
        for start in range(0, samples, batch_size):
            count = min(batch_size, samples - start)
            rows.append(_sample(model, first, count, seq_len, temperature, generator, device).cpu())
            log.info("generated calibration windows %d-%d of %d", start + 1, start + count, samples)
    finally:
        model.to(home).train(was_training)
    return torch.cat(rows)


def _sample(model: nn.Module, first: int, count: int, seq_len: int, temperature: float,
            generator: torch.Generator, device: torch.device) -> torch.Tensor:
    ids = torch.full((count, seq_len), first, dtype=torch.long, device=device)
    cache = None
    for position in range(1, seq_len):
        out = model(input_ids=ids[:, position - 1 : position], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
        ids[:, position] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return ids
