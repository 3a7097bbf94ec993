"""Rotating the residual stream into the weights (QuaRot / SpinQuant's R1, fused: no runtime change).

A pre-norm transformer's residual stream h (..., D) is only ever read through RMS norms and written by sums
of linear outputs. For an orthogonal Q (D, D) the model computes the same function on h' = h Q when
- the embedding table is E Q (every token's row rotated);
- each norm's weight g is folded into the linear layers reading it (W -> W diag(g), the norm's weight set to
  one), since RMS(h Q) = RMS(h) but g does not commute with Q; those readers then take W diag(g) Q;
- each linear layer writing to the stream (attention output, MLP down projection) takes Q^T W, bias Q^T b;
- the output head reads the final norm like any reader (so a head tied to the embedding is untied first:
  E diag(g) Q is not E Q; only where the final norm's gain is one do they stay one table).
The function is unchanged; the weights are not. Outlier input channels, which a per-group grid spends its
range on, are spread over all D channels by Q, so every group's values look alike: round-to-nearest and
GPTQ then quantize them with a smaller error, and less of the error depends on which channels the
calibration text happened to make large. Q is a randomized Hadamard matrix (the largest power-of-two factor
of D as a Sylvester Hadamard block, times a random orthogonal block for the odd factor, with random signs),
or a random orthogonal matrix.

Found by structure, checked by data, never by name: per block, the readers are the linear layers whose input
is the very output of a norm (a leaf module with only a (D,) weight); the writers are the other linear layers
with D outputs. Every block is rotated on a copy first and its output compared with the original's, rotated;
any block that does not match (LayerNorm's mean subtraction, norms after the attention output as in Gemma 2/3,
fused mixture-of-experts weights) stops the rotation before the model is changed, with the reason.

`RotateConfig(learn_steps=N)` then learns a second rotation on calibration windows, fitted to the quantized model's
KL (SpinQuant's R1; algorithms/rotate_learn.py), and folds it in the same way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from modelpress.algorithms.prune.structured import head_dim_of
from modelpress.engine.blocks import BlockStack, find_blocks
from modelpress.engine.capture import capture_inputs, run_block
from modelpress.engine.targets import find_expert_params
from modelpress.errors import ModelpressError
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.layers import is_linear, linear_weight

ROTATION_KINDS = ("hadamard", "orthogonal")


@dataclass(frozen=True)
class RotateConfig:
    seed: int = 0
    kind: str = "hadamard"           # "hadamard" (randomized, Kronecker with an orthogonal odd factor) | "orthogonal"
    probe_tokens: int = 32           # length of the random token window every block is checked on
    massive: float = 0.0             # > 0: channels whose largest value on the probe exceeds this many times the
                                     # median channel's are kept out of the rotation (0: rotate all of them; see
                                     # _massive_channels for when that is worth it)
    heads: bool = False              # also rotate each attention head's values (SpinQuant's R2): the value
                                     # projection's rows and the output projection's columns, head by head
    learn_steps: int = 0             # > 0: then fit a second rotation to the quantized model's KL on calibration
                                     # windows (algorithms/rotate_learn.py; needs the windows and the scheme)
    learn_rate: float = 1e-3         # Adam's rate on the rotation's skew-symmetric generator
    learn_batch: int = 4             # calibration windows per step

    def __post_init__(self) -> None:
        if self.kind not in ROTATION_KINDS:
            raise ModelpressError(f"rotation kind {self.kind!r} is not one of {', '.join(ROTATION_KINDS)}")
        if self.massive < 0:
            raise ModelpressError(f"massive must be 0 (rotate every channel) or a positive ratio, got {self.massive}")
        if self.probe_tokens < 2:
            raise ModelpressError(f"probe_tokens must be at least 2, got {self.probe_tokens}")
        if self.learn_steps < 0 or self.learn_rate <= 0 or self.learn_batch < 1:
            raise ModelpressError(f"learn_steps must be 0 or more, learn_rate positive and learn_batch at least 1, "
                                  f"got {self.learn_steps}, {self.learn_rate}, {self.learn_batch}")


@dataclass(frozen=True)
class RotationReport:
    hidden_size: int
    kind: str
    blocks: int
    readers: int                     # linear layers reading the stream through a norm (norm folded in)
    writers: int                     # linear layers writing to the stream
    kept_channels: tuple[int, ...]   # massive channels left out of the rotation
    untied_head: bool                # the head was tied to the embedding: it now has its own table
    added_parameters: int            # parameters the untied head adds
    worst_block_error: float         # relative error of a rotated block's output (the check)
    logits_error: float              # relative error of the whole model's logits after rotation
    head_dim: int = 0                # the per-head rotation's size (0: not asked for)
    rotated_heads: tuple[str, ...] = ()   # blocks whose value/output pair was rotated per head
    unrotated_heads: tuple[str, ...] = ()  # blocks where it was asked for and no pair kept the function
    learn_steps: int = 0             # steps of the learned rotation (0: none)
    learn_kl: tuple[float, float] = (0.0, 0.0)   # its loss (KL, fake-quantized vs float) over the first and
                                                 # last tenth of the steps

    def summary(self) -> str:
        untied = (f"; the output head untied from the embedding (+{self.added_parameters:,} parameters)"
                  if self.untied_head else "")
        kept = f", channels {list(self.kept_channels)} kept out (massive)" if self.kept_channels else ""
        heads = ""
        if self.head_dim:
            heads = (f"; values rotated per head (head_dim {self.head_dim}) in {len(self.rotated_heads)} of "
                     f"{self.blocks} blocks")
            if self.unrotated_heads:
                heads += f" (no value/output pair keeps the function in {', '.join(self.unrotated_heads[:4])})"
        learned = (f"; then a rotation learnt in {self.learn_steps} steps (quantized model's KL {self.learn_kl[0]:.4f} "
                   f"-> {self.learn_kl[1]:.4f})" if self.learn_steps else "")
        return (f"residual stream rotated ({self.kind}, D={self.hidden_size}{kept}): {self.readers} readers, "
                f"{self.writers} writers in {self.blocks} blocks{heads}{learned}; logits within "
                f"{self.logits_error:.1e} relative{untied}")


# ---- the rotation matrix ----------------------------------------------------------------------------------

def _sylvester(size: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / size ** 0.5


def _random_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()     # Haar-distributed


def rotation_matrix(size: int, seed: int = 0, kind: str = "hadamard", keep: tuple[int, ...] = ()) -> torch.Tensor:
    """An orthogonal (size, size) float64 matrix, the same for the same arguments. Channels in `keep` map to
    themselves (rows and columns of the identity); the rest are rotated among themselves."""
    if keep:
        rest = [c for c in range(size) if c not in set(keep)]
        q = torch.eye(size, dtype=torch.float64)
        if rest:
            index = torch.tensor(rest)
            q[index[:, None], index[None, :]] = rotation_matrix(len(rest), seed, kind)
        return q
    generator = torch.Generator().manual_seed(seed)
    if kind == "orthogonal":
        return _random_orthogonal(size, generator)
    power = size & -size                                  # largest power of two dividing size
    block = torch.kron(_sylvester(power), _random_orthogonal(size // power, generator))
    signs = torch.randint(0, 2, (size,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs[:, None] * block


# ---- the fold: pure edits of weights ----------------------------------------------------------------------

def _norm_gain(norm: nn.Module) -> tuple[torch.Tensor, float]:
    """(the norm's per-channel gain g, the weight value that makes g one). A norm multiplying by its weight
    gives (weight, 1.0); one multiplying by (1 + weight), as Gemma's, gives (1 + weight, 0.0)."""
    weight = norm.weight
    probe = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = probe.to(weight.device, weight.dtype)   # a private generator: the caller's random state is left alone
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(0)
            at_zero = norm(probe).float()
            weight.fill_(1)
            at_one = norm(probe).float()
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    if at_zero.abs().max() == 0:
        return saved.double(), 1.0
    if torch.allclose(at_one, 2 * at_zero, rtol=1e-2, atol=1e-3):
        return saved.double() + 1, 0.0
    raise ModelpressError(f"norm {type(norm).__name__} neither multiplies by its weight nor by (1 + weight): "
                          "its gain cannot be folded into the layers reading it")


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _rotate_readers(readers: list[nn.Module], gain: torch.Tensor, q: torch.Tensor) -> None:
    for module in readers:
        weight = linear_weight(module)                    # (out, D)
        qd = q.to(weight.device)
        _set(weight, (weight.double() * gain.to(weight.device)[None, :]) @ qd)


def _rotate_writer(module: nn.Module, q: torch.Tensor) -> None:
    weight = linear_weight(module)                        # (D, in)
    qd = q.to(weight.device)
    _set(weight, qd.T @ weight.double())
    bias = getattr(module, "bias", None)
    if bias is not None:
        _set(bias, qd.T @ bias.double())


# ---- structure: which layers read and write the stream ----------------------------------------------------

@dataclass
class _BlockRoles:
    norms: dict[str, list[str]]       # norm name -> names of the linear layers reading its output
    writers: list[str]
    heads: tuple[str, str] | None = None   # (value projection, attention output) rotated head by head


def _key(t: torch.Tensor) -> tuple:
    """The same values in memory: a tensor and a full view of it (transformers slices the head's input with
    logits_to_keep) share this key."""
    return t.data_ptr(), tuple(t.shape), t.stride()


def _is_norm(module: nn.Module, size: int) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return (not list(module.children()) and set(params) == {"weight"} and params["weight"].dim() == 1
            and params["weight"].shape[0] == size)


def _block_roles(block: nn.Module, hidden: torch.Tensor, call, size: int) -> tuple[_BlockRoles, torch.Tensor]:
    """One forward of the block with hooks: which norm outputs are exactly which linear layers' inputs, and the
    block's output."""
    outputs: dict[tuple, str] = {}
    inputs: dict[str, tuple] = {}
    kept: list[torch.Tensor] = []                         # alive while the hooks run: no address is reused
    handles = []
    for name, module in block.named_modules():
        if _is_norm(module, size):
            def record_out(_m, _args, out, name=name):
                kept.append(out)
                outputs[_key(out)] = name
            handles.append(module.register_forward_hook(record_out))
        elif is_linear(module):
            def record_in(_m, args, name=name):
                kept.append(args[0])
                inputs[name] = _key(args[0])
            handles.append(module.register_forward_pre_hook(record_in))
    try:
        output = run_block(block, hidden, call)
    finally:
        for handle in handles:
            handle.remove()
    norms: dict[str, list[str]] = {}
    for linear, source in inputs.items():
        if source in outputs:
            norms.setdefault(outputs[source], []).append(linear)
    read = {name for names in norms.values() for name in names}
    writers = [name for name, module in block.named_modules()
               if is_linear(module) and name not in read and linear_weight(module).shape[0] == size]
    return _BlockRoles(norms, writers), output


def _rotate_heads(block: nn.Module, pair: tuple[str, str], r: torch.Tensor) -> None:
    """Per head h of size d = r's: the value projection's rows W_v,h -> r^T W_v,h (bias likewise) and the output
    projection's columns W_o,h -> W_o,h r. Every value head's output is r^T v_h, attention mixes positions only, and
    the output projection undoes r: the same function, whichever query heads share a value head."""
    modules = dict(block.named_modules())
    value, output = modules[pair[0]], modules[pair[1]]
    d = r.shape[0]
    weight = linear_weight(value)                         # (heads * d, in)
    rd = r.to(weight.device)
    _set(weight, torch.einsum("ji,hjk->hik", rd, weight.double().reshape(-1, d, weight.shape[1])).reshape(weight.shape))
    bias = getattr(value, "bias", None)
    if bias is not None:
        _set(bias, (bias.double().reshape(-1, d) @ rd).reshape(bias.shape))
    weight = linear_weight(output)                        # (D, heads * d)
    _set(weight, (weight.double().reshape(weight.shape[0], -1, d) @ rd).reshape(weight.shape))


def _head_candidates(block: nn.Module, roles: _BlockRoles, head_dim: int) -> list[tuple[str, str]]:
    """(reader, writer) pairs that could be a value projection and the attention output: the reader's rows and the
    writer's columns whole heads, the writer's heads a multiple of the reader's (grouped queries). Which one is
    the value pair is left to the data (a key or query projection, or an MLP, does not keep the function)."""
    modules = dict(block.named_modules())
    readers = [name for names in roles.norms.values() for name in names]
    pairs = []
    for writer in roles.writers:
        columns = linear_weight(modules[writer]).shape[1]
        for reader in readers:
            rows = linear_weight(modules[reader]).shape[0]
            if columns % head_dim == 0 and rows % head_dim == 0 and columns % rows == 0:
                pairs.append((reader, writer))
    return pairs


def _find_heads(block: nn.Module, roles: _BlockRoles, head_dim: int, r: torch.Tensor, hidden: torch.Tensor, call,
                expected: torch.Tensor) -> tuple[str, str] | None:
    """The value/output pair whose per-head rotation (on a copy) keeps the block's output, or None."""
    for pair in _head_candidates(block, roles, head_dim):
        trial = copy.deepcopy(block)
        _rotate_heads(trial, pair, r)
        error = _relative_error(run_block(trial, hidden, call), expected)
        del trial
        if error <= _tolerance(hidden.dtype):
            return pair
    return None


def _rotate_block(block: nn.Module, roles: _BlockRoles, q: torch.Tensor, r: torch.Tensor | None = None) -> None:
    if roles.heads:                                       # set only where a head rotation r was asked for
        _rotate_heads(block, roles.heads, r)
    modules = dict(block.named_modules())
    for norm_name, readers in roles.norms.items():
        norm = modules[norm_name]
        gain, unit = _norm_gain(norm)
        _rotate_readers([modules[r] for r in readers], gain, q)
        with torch.no_grad():
            norm.weight.fill_(unit)
    for name in roles.writers:
        _rotate_writer(modules[name], q)


def _massive_channels(inputs: list[torch.Tensor], ratio: float) -> tuple[int, ...]:
    """Channels of the stream whose largest value over the blocks' inputs is `ratio` times the median channel's
    or more. These carry the attention sink's massive activations (the first token's, thousands of times the
    rest); the norms' gains on them are near zero, so unrotated their weights' rounding errors are multiplied
    by almost nothing. Rotated, the sink token's input spreads over every channel and its errors with it: on
    SmolLM2-135M (channel 507, 500x the median) keeping it out helped round-to-nearest int4 (+116% PPL against
    +165% rotating it, +119% unrotated) but hurt GPTQ int3 (+87% against +54%: GPTQ's Hessian sees the sink
    and compensates, and the other 575 channels lose the Hadamard structure 576 = 64 x 9 had). Off by default."""
    if ratio == 0:
        return ()
    peak = torch.stack([h.detach().abs().reshape(-1, h.shape[-1]).amax(0).float() for h in inputs]).amax(0)
    return tuple(int(c) for c in torch.nonzero(peak >= ratio * peak.median()).flatten())


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


# ---- outside the blocks: embedding, final norm, head ------------------------------------------------------

def _final_norm(model: nn.Module, stack: BlockStack, head: nn.Module, ids: torch.Tensor, size: int) -> nn.Module:
    """The norm whose output is the head's input; every other parameter outside the blocks must be the
    embedding's, so that nothing else reads or writes the stream unrotated."""
    embedding = model.get_input_embeddings()
    inside = {id(p) for p in stack.blocks.parameters()}
    seen: dict = {}
    candidates = [m for m in model.modules() if _is_norm(m, size) and id(m.weight) not in inside]
    def record_out(module, _args, out) -> None:
        seen[_key(out)] = module

    def record_head(_module, args) -> None:
        seen["head"] = args[0]

    handles = [m.register_forward_hook(record_out) for m in candidates]
    handles.append(head.register_forward_pre_hook(record_head))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    norm = seen.get(_key(seen["head"])) if "head" in seen else None
    if norm is None:
        raise ModelpressError("the output head does not read a final RMS norm's output directly: the residual "
                              "stream cannot be rotated in this model")
    known = {id(embedding.weight), id(linear_weight(head)), id(norm.weight)}
    if getattr(head, "bias", None) is not None:
        known.add(id(head.bias))
    others = [name for name, p in model.named_parameters() if id(p) not in inside and id(p) not in known]
    if others:
        raise ModelpressError(f"parameters outside the blocks besides the embedding, final norm and head "
                              f"({', '.join(others[:4])}) may read or write the residual stream: not rotated")
    return norm


def _untie(head: nn.Module, embedding: nn.Module, model: nn.Module) -> int:
    """Give a head tied to the embedding its own table; returns the parameters added (0 if it was not tied)."""
    if linear_weight(head) is not embedding.weight:
        return 0
    head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad)
    for config in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    return head.weight.numel()


# ---- the entry point --------------------------------------------------------------------------------------

@torch.no_grad()
def rotate_residual(model: nn.Module, config: RotateConfig | None = None, calibration: torch.Tensor | None = None,
                    scheme: WeightScheme | str | None = None) -> RotationReport:
    """Rotate `model`'s residual stream in place (see the module docstring). Every block is checked on a
    copy before the model is changed; a model the rotation does not fit raises ModelpressError unchanged.
    With config.learn_steps, a second rotation is then learnt (algorithms/rotate_learn.py) on `calibration`
    ((windows, seq_len) token ids) for the weight scheme `scheme` (a WeightScheme or its spec) the model will be
    quantized to."""
    config = config or RotateConfig()
    if config.learn_steps and (calibration is None or scheme is None):
        raise ModelpressError("a learned rotation (learn_steps) needs calibration windows and the weight scheme the "
                              "model will be quantized to")
    stack = find_blocks(model)
    if any(find_expert_params(block) for block in stack.blocks):
        raise ModelpressError("blocks with fused mixture-of-experts weights are not rotated (their experts read "
                              "routed copies of the stream, not a norm's output)")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is None or head is None or not is_linear(head):
        raise ModelpressError("rotation needs a token embedding and a linear output head")
    size = embedding.weight.shape[1]
    device = embedding.weight.device
    vocab = embedding.weight.shape[0]
    ids = torch.randint(0, vocab, (1, config.probe_tokens), generator=torch.Generator().manual_seed(config.seed))
    ids = ids.to(device)
    norm = _final_norm(model, stack, head, ids, size)
    reference = model(input_ids=ids).logits.float()
    captured = capture_inputs(model, stack, ids, device, batch_size=1)

    # the blocks' inputs on the probe, and which norms feed which layers
    inputs, plans = [captured.hidden[0]], []
    for index, block in enumerate(stack.blocks):
        call = captured.calls[index][0]
        roles, output = _block_roles(block, inputs[-1], call, size)
        plans.append(roles)
        inputs.append(output)
    keep = _massive_channels(inputs[:-1], config.massive)
    q = rotation_matrix(size, config.seed, config.kind, keep)
    head_dim, r = 0, None
    if config.heads:
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head_dim = head_dim_of(text)                   # names the missing field when there is none
        r = rotation_matrix(head_dim, config.seed + 1, config.kind)
        for index, (block, roles) in enumerate(zip(stack.blocks, plans)):
            roles.heads = _find_heads(block, roles, head_dim, r, inputs[index], captured.calls[index][0],
                                      inputs[index + 1])

    # every block checked on a copy first: the model is changed only once all of them fit
    worst = 0.0
    for index, (block, roles) in enumerate(zip(stack.blocks, plans)):
        call, hidden, expected = captured.calls[index][0], inputs[index], inputs[index + 1]
        trial = copy.deepcopy(block)
        _rotate_block(trial, roles, q, r)
        qd = q.to(hidden.device)
        rotated = run_block(trial, (hidden.double() @ qd).to(hidden.dtype), call)
        error = _relative_error(rotated.double() @ qd.T, expected)
        del trial
        if error > _tolerance(hidden.dtype):
            readers = sorted(r for names in roles.norms.values() for r in names)
            raise ModelpressError(
                f"block {stack.block_name(index)} does not keep its function under a residual rotation (relative "
                f"error {error:.1e}; readers found: {', '.join(readers) or 'none'}; writers: "
                f"{', '.join(roles.writers) or 'none'}). Rotation fits pre-norm blocks with RMS norms whose outputs "
                "feed linear layers directly (Llama, Mistral, Qwen2/3, Phi-3); the model is unchanged")
        worst = max(worst, error)

    gain, unit = _norm_gain(norm)
    tied = linear_weight(head) is embedding.weight
    # a tied head reading a final norm of gain one is the rotated embedding itself: it stays tied
    added = _untie(head, embedding, model) if tied and not bool((gain == 1).all()) else 0
    if not tied or added:
        _rotate_readers([head], gain, q)
    norm.weight.fill_(unit)
    _set(embedding.weight, embedding.weight.double() @ q.to(embedding.weight.device))
    for block, roles in zip(stack.blocks, plans):
        _rotate_block(block, roles, q, r)
    learn_kl = (0.0, 0.0)
    if config.learn_steps:
        learn_kl = _learn_and_apply(model, stack, plans, head if not tied or added else None, calibration, scheme,
                                    config)
    logits_error = _relative_error(model(input_ids=ids).logits.float(), reference)
    block_names = [stack.block_name(index) for index in range(len(stack.blocks))]
    return RotationReport(size, config.kind, len(stack.blocks),
                          sum(len(readers) for roles in plans for readers in roles.norms.values()),
                          sum(len(roles.writers) for roles in plans), keep, added > 0, added, worst, logits_error,
                          head_dim, tuple(n for n, roles in zip(block_names, plans) if roles.heads),
                          tuple(n for n, roles in zip(block_names, plans) if config.heads and not roles.heads),
                          config.learn_steps, learn_kl)


def _learn_and_apply(model: nn.Module, stack: BlockStack, plans: list[_BlockRoles], head: nn.Module | None,
                     calibration: torch.Tensor, scheme: WeightScheme | str,
                     config: RotateConfig) -> tuple[float, float]:
    """Learn a second rotation on the rotated model (every norm's gain is one now) and fold it in like the first:
    readers W Q, writers Q^T W, the embedding E Q and an untied head H Q. Returns the loss over the first and last
    tenth of the steps."""
    from modelpress.algorithms.rotate_learn import learn_rotation

    readers, writers = [], []
    for block, roles in zip(stack.blocks, plans):
        modules = dict(block.named_modules())
        readers += [modules[name] for names in roles.norms.values() for name in names]
        writers += [modules[name] for name in roles.writers]
    learned = learn_rotation(model, readers, writers, head, calibration, scheme, config.learn_steps,
                             config.learn_rate, config.learn_batch, config.seed)
    q = learned.q
    one = torch.ones(q.shape[0], dtype=torch.float64)
    _rotate_readers(readers + ([head] if head is not None else []), one, q)
    for module in writers:
        _rotate_writer(module, q)
    embedding = model.get_input_embeddings()
    _set(embedding.weight, embedding.weight.double() @ q.to(embedding.weight.device))
    tenth = max(1, len(learned.losses) // 10)
    return (sum(learned.losses[:tenth]) / tenth, sum(learned.losses[-tenth:]) / tenth)
