"""The decoders a DecodeSession (session.py) keeps between its generations, so that only its first call pays for
building them: a StaticDecoder's cache buffers and captured CUDA graphs, a NativeDecoder's cache and C structs.

One decoder is kept a role ("model", "target", "draft", "rows:B"). A call gets the kept one back, restarted, when it
fits: at least the positions the call needs and at most twice that rounded up to LENGTH_STEP (attention reads the
whole static buffer each step, so a far larger one would slow the short call down), and whatever else the caller
asks of it (`suits`: a draft on the target's cache must be on the cache of the target decoder the call got). Any
other call builds a decoder of the rounded-up length in its place, the old one released first.

A kept decoder's cache still holds the keys and values its last generation wrote. The pool remembers those tokens
(`remember`), and a later call whose prompt starts with some of them runs only the rest of its prompt
(`held_prefix`): a conversation's next turn, or prompts after one long shared instruction, skip the part the cache
holds. A decoder rebuilt in its place gets those keys and values copied over (`take_prefix`; the two are alive
together for that moment), so a conversation that outgrows its cache keeps them too. The reused positions' keys and
values are those of the earlier call, computed in its prefill or its steps, so they equal a fresh prefill's up to
float rounding (the products of a token are summed in another order when it runs alone than among others).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar


class Restartable(Protocol):
    max_len: int

    def restart(self) -> None: ...


D = TypeVar("D", bound=Restartable)


class DecoderPool:
    LENGTH_STEP = 256

    def __init__(self, reuse_prefix: bool = True) -> None:
        self.kept: dict[str, Restartable] = {}
        self.held: dict[str, list[int]] = {}  # a kept decoder's tokens, whose keys and values its cache holds
        self.reuse_prefix = reuse_prefix
        self.built = self.reused = 0

    def decoder(self, role: str, max_len: int, build: Callable[[int], D],
                suits: Callable[[D], bool] | None = None) -> D:
        """The kept decoder of `role`, restarted, if it fits `max_len` positions (and `suits`); else
        `build(length)` for max_len rounded up to LENGTH_STEP, kept in its place."""
        length = -(-max_len // self.LENGTH_STEP) * self.LENGTH_STEP
        kept = self.kept.get(role)
        if kept is not None and max_len <= kept.max_len <= 2 * length and (suits is None or suits(kept)):
            kept.restart()
            self.reused += 1
            return kept  # type: ignore[return-value]
        old, held = self.kept.pop(role, None), self.held.pop(role, [])
        if not (held and self.reuse_prefix and getattr(old, "keeps_prefix", False)):
            old = None  # its buffers and graphs go before the new ones are allocated
        decoder = build(length)
        if old is not None and hasattr(decoder, "take_prefix"):  # a longer conversation keeps its prefix
            held = held[:length - 1]
            decoder.take_prefix(old, len(held))
            self.held[role] = held
        self.kept[role] = decoder
        self.built += 1
        return decoder

    def held_prefix(self, role: str, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` the kept decoder of `role` holds the keys and values of, at most
        all but the last (whose logits the call needs); 0 where prefixes are not reused. The pool then forgets
        what the decoder held: the call overwrites what follows the prefix, and says what it left (`remember`)
        only once it is done."""
        held = self.held.pop(role, [])
        decoder = self.kept.get(role)
        if not (self.reuse_prefix and getattr(decoder, "keeps_prefix", False)):
            return 0
        n, limit = 0, min(len(held), len(prompt) - 1)
        while n < limit and held[n] == prompt[n]:
            n += 1
        return n

    def remember(self, role: str, tokens: list[int]) -> None:
        """The tokens whose keys and values the decoder of `role` holds, from position 0, after a generation."""
        if role in self.kept:
            self.held[role] = list(tokens)

    def clear(self) -> None:
        self.kept.clear()
        self.held.clear()


def pooled(pool: DecoderPool | None, role: str, max_len: int, build: Callable[[int], D],
           suits: Callable[[D], bool] | None = None) -> D:
    """A decoder for one generation: built for exactly max_len without a pool, else the pool's."""
    return build(max_len) if pool is None else pool.decoder(role, max_len, build, suits)
