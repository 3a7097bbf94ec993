"""Many generations from one model, prepared once: `DecodeSession`.

Each call of `generate` (decoding.py), `speculative_generate` and `generate_batch` prepares the model for itself and
undoes it on the way out: on CUDA the decode-time fusions (fusion.py: sibling projections stacked, int4 layers
re-laid for the tensor-core GEMV, their agreement checks), then a StaticDecoder whose forwards are captured in CUDA
graphs on their first run; on the CPU the native step's structs. On a 7B-shaped int4 model on an H100 that is about
0.23 s a call, against 0.18 s for 64 new tokens (bench/session.py; the bf16 7B-shaped target of a self-speculative
call: 0.04 s alone, 0.09 s with its draft).

A session does it once: the fusions stay applied while it is open, and its decoders, with their caches and graphs,
are kept between calls (decoder_pool.py says which call gets which). Its outputs are the calls' own: a generation
writes every cache slot it reads, so what the last one left is never seen. While it is open the model must not
change: its graphs hold the addresses of the weights (and of the fused copies), and the fusions have replaced
modules. Close it (or leave its `with` block) to undo the fusions and free the decoders.

    with DecodeSession(model, GenerationSettings(max_new_tokens=128)) as session:
        for prompt in prompts:
            result = session.generate(prompt)

One prompt a call, or a list of prompts decoded together (`rows` > 1: batch_decode.py); with a draft every call
decodes speculatively. A one-prompt call runs only the part of its prompt after what the caches hold from the last
such call (the prompt's first tokens equal to those that call read and wrote: a conversation's next turn, prompts
after one shared instruction; decoder_pool.py), unless `reuse_prefix` is False. Per call it takes another length
limit, sampling or end tokens; the rest of the settings (decode path, KV cache, compile, fusions) is the session's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.inference.decoder_pool import DecoderPool
from modelpress.inference.decoding import (IN_SESSION, GenerationResult, GenerationSettings, TokenCallback,
                                           kernel_context, prompt_list)
from modelpress.inference.sampling import SamplingConfig


class DecodeSession:
    """`model` (and `draft`, for speculative decoding under `speculative`, a SpeculativeConfig) prepared for
    generations of `settings`, each of one prompt, or of up to `rows` prompts decoded together (no draft then);
    reuse_prefix: a prompt's leading tokens whose keys and values the cache holds are not run again."""

    def __init__(self, model: nn.Module, settings: GenerationSettings | None = None, draft: nn.Module | None = None,
                 speculative=None, rows: int = 1, encode: Callable[[str], list[int]] | None = None,
                 reuse_prefix: bool = True) -> None:
        from modelpress.inference.speculative import SpeculativeConfig, check_same_vocabulary

        if rows < 1:
            raise ModelpressError(f"a session decodes at least one row at a time, got rows={rows}")
        if draft is not None and rows > 1:
            raise ModelpressError("speculative decoding takes one prompt at a time: a session with a draft has rows=1")
        if draft is not None:
            check_same_vocabulary(model, draft)
        self.model, self.draft, self.rows, self.encode = model, draft, rows, encode
        self.settings = GenerationSettings() if settings is None else settings
        self.speculative = (SpeculativeConfig() if speculative is None else speculative) if draft is not None else None
        self.pool = DecoderPool(reuse_prefix)
        self._stack = contextlib.ExitStack()
        if draft is None:
            context = kernel_context(self.settings, model, rows=rows)
        else:
            k = self.speculative.draft_tokens
            context = kernel_context(self.settings, model, draft, verifiers=(model,), verify_rows=k + 1)
        self.fusions = self._stack.enter_context(context)
        self.held = [m for m in dict.fromkeys((model, draft)) if m is not None]
        IN_SESSION.update(self.held)
        self.closed = False

    def __enter__(self) -> DecodeSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the kept decoders (caches, graphs) and undo the fusions; later calls are refused."""
        if not self.closed:
            self.closed = True
            self.pool.clear()
            for model in self.held:
                IN_SESSION.discard(model)
            self._stack.close()

    def __del__(self) -> None:  # a session dropped unclosed: undo its fusions rather than leave the model prepared
        if not getattr(self, "closed", True):
            self.close()

    @property
    def decoders_reused(self) -> int:
        """Decoders a call got from an earlier one (each model of a speculative call counts)."""
        return self.pool.reused

    @torch.no_grad()
    def generate(self, prompt: str | Sequence[int] | torch.Tensor, max_new_tokens: int | None = None,
                 sampling: SamplingConfig | None = None, eos_token_ids: tuple[int, ...] | None = None,
                 generator: torch.Generator | None = None, on_tokens: TokenCallback | None = None) -> GenerationResult:
        """New tokens after one prompt (token ids, or a text where the session has `encode`), as `generate` (or
        `speculative_generate`, with a draft) would give them with these settings."""
        settings = self._call_settings(max_new_tokens, sampling, eos_token_ids)
        return self.generate_one(self._ids(prompt), settings, generator, on_tokens)

    @torch.no_grad()
    def generate_one(self, ids: list[int], settings: GenerationSettings, generator: torch.Generator | None = None,
                     on_tokens: TokenCallback | None = None) -> GenerationResult:
        """generate on token ids with whole settings (the session's, changed only where a call may change them)."""
        from modelpress.inference.decoding import _generate
        from modelpress.inference.speculative import _speculative_generate

        if self.draft is None:
            result = _generate(self.model, ids, settings, None, generator, on_tokens, self.fusions, self.pool)
        else:
            result = _speculative_generate(self.model, self.draft, ids, settings, self.speculative, None, None,
                                           generator, on_tokens, self.fusions, self.pool)
        result.fusions = self.fusions.summary()
        return result

    @torch.no_grad()
    def generate_rows(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int | None = None,
                      sampling: SamplingConfig | None = None, eos_token_ids: tuple[int, ...] | None = None,
                      generator: torch.Generator | None = None):
        """New tokens for each of up to `rows` prompts decoded together, as `generate_batch` gives them; a
        BatchGenerationResult."""
        from modelpress.inference.batch_decode import generate_batch

        if not 1 <= len(prompts) <= self.rows:
            raise ModelpressError(f"{len(prompts)} prompts for a session of {self.rows} rows at a time")
        settings = self._call_settings(max_new_tokens, sampling, eos_token_ids)
        return generate_batch(self.model, [self._ids(p) for p in prompts], settings, generator=generator,
                              session=self)

    def _call_settings(self, max_new_tokens, sampling, eos_token_ids) -> GenerationSettings:
        if self.closed:
            raise ModelpressError("this decode session is closed: open a new one")
        changes = {name: value for name, value in (("max_new_tokens", max_new_tokens), ("sampling", sampling),
                                                    ("eos_token_ids", eos_token_ids)) if value is not None}
        return dataclasses.replace(self.settings, **changes) if changes else self.settings

    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.encode is None:
                raise ModelpressError("a text prompt needs a tokenizer: open the session with one, or give token ids")
            return list(self.encode(prompt))
        return prompt_list(prompt)
