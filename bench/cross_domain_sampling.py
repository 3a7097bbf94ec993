"""Does the way calibration text is sampled from the model change how int3 generalizes? (issue 16 item 5)

`--calib-text generated` samples windows from the float model at temperature 1, each from its document-start
token (io/generated.py). This bench tries variants of that sampling for one calibrated scheme (AWQ+GPTQ
int3-asym/g128 by default) and scores each model, as soon as it is built, on other generated samples
(seed 1, temperature 1: the "in-domain" text) and on the named corpora, reporting the worst ratio
out-of-domain dPPL / in-domain dPPL.

A variant is SAMPLING/METHOD, SAMPLING one of
  gen           io/generated.py itself (temperature 1, from the start token)
  s:t=X,r=N,u=F,seed=S
                temperature X, and N tokens after the start token drawn uniformly from the vocabulary's
                ordinary tokens (LLM-QAT's data-free trick) before sampling continues; a fraction F of the
                windows wholly uniform random tokens after the start token (every embedding row seen);
                seed S (default 0; s:seed=2 is another set of samples drawn like gen's)
  A&B           the windows of both samplings, one set after the other (s:seed=2&s:seed=3: twice the samples)
  ...@cut=N     (after the samplings) the windows laid end to end and cut again N tokens later, so that no window
                starts at a document's start token: each is the end of one sample and the start of the next, as an
                evaluation window cut from a corpus starts mid-text (s:seed=2&s:seed=3@cut=256)
and METHOD one of rtn (round to nearest, no calibration), awq-gptq, awq-gptq-duo (AWQ's duo scaling) or
gptq[=DAMP], the calibrated ones optionally followed by
+KEY=VALUE settings of the solver (awq-gptq+damp=0.3+amax=0.5):
  damp=X        GPTQ's damp (also inside AWQ+GPTQ)
  amax=X        AWQ's exponents a scaled into [0, X) (the same number of candidates)
  ts=1          GPTQ's true-sequential re-runs between dependency levels
  fit=1         GPTQ fits the float model's outputs (GPTQConfig.float_target: each layer also makes up for the
                error of the layers quantized before it)
  shrink=N      GPTQ's scale shrink steps (1: no search)
  order=0       GPTQ visits columns in their own order instead of by decreasing H_ii (act_order off)
  flat=1        GPTQ's scale search (shrink) weighs every column of a group alike instead of by the
                calibration Hessian's diagonal: ranges searched on the weights alone
  decor=X       GPTQ's Hessian shrunk towards its diagonal, (1 - X) H + X diag(H), before the damp: the
                channels' weights kept, a fraction X of their correlations (the most domain-specific part of
                the calibration statistics) dropped
Any METHOD (rtn too) may end in +rot=hadamard or +rot=orthogonal: the residual stream rotated into the weights
first (algorithms/rotate.py; the output head untied from the embedding), then the method run on the rotated model;
+massive=X sets RotateConfig.massive (0: every channel rotated, none kept out); +heads=1 also rotates the values
head by head (RotateConfig.heads, SpinQuant's R2); +rseed=N draws another rotation (RotateConfig.seed, default 0);
+learn=N then learns a second rotation in N steps on the calibration windows (RotateConfig.learn_steps, SpinQuant's
R1 fitted to the scheme's round-to-nearest KL; +lr=X its Adam rate).
`--windows-cache DIR` keeps every sampled set of windows there, so another run reuses them.

    PYTHONPATH=src python bench/cross_domain_sampling.py --device cuda gen/awq-gptq s:t=0.9/awq-gptq \\
        s:t=0.8,r=1/awq-gptq s:r=1/gptq=0.1
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scoring import materialize, release_memory, score, shared_copy, write_json

from modelpress.algorithms.quantize import awq as awq_module
from modelpress.algorithms.quantize import gptq as gptq_module
from modelpress.algorithms.quantize.awq import AWQConfig, quantize_awq
from modelpress.algorithms.quantize.gptq import GPTQConfig, quantize_gptq
from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.algorithms.rotate import RotateConfig, rotate_residual
from modelpress.api import EvalSettings, prepare_windows
from modelpress.errors import ModelpressError
from modelpress.io.generated import generated_windows, start_token
from modelpress.io.model import load_model

log = logging.getLogger("bench.cross_domain_sampling")


def ordinary_tokens(model, tokenizer) -> torch.Tensor:
    """Ids of the vocabulary's tokens that are not special ones (what random tokens are drawn from)."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(model.config.vocab_size) if i not in special])


@torch.no_grad()
def sample(model, tokenizer, count: int, seq_len: int, seed: int, temperature: float = 1.0, random_first: int = 0,
           batch: int = 128) -> torch.Tensor:
    """(count, seq_len) windows: the start token, `random_first` uniform ordinary tokens, then the model's
    samples at `temperature` (random_first=0, temperature=1 is io/generated.py's distribution)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    vocab = ordinary_tokens(model, tokenizer).to(device)
    rows = []
    for begin in range(0, count, batch):
        n = min(batch, count - begin)
        ids = torch.full((n, seq_len), start_token(tokenizer), dtype=torch.long, device=device)
        for j in range(1, 1 + random_first):
            ids[:, j] = vocab[torch.randint(len(vocab), (n,), generator=generator, device=device)]
        out = model(input_ids=ids[:, : 1 + random_first], use_cache=True)
        for position in range(1 + random_first, seq_len):
            probs = torch.softmax(out.logits[:, -1].float() / temperature, -1)
            ids[:, position] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            out = model(input_ids=ids[:, position : position + 1], past_key_values=out.past_key_values, use_cache=True)
        rows.append(ids.cpu())
    return torch.cat(rows)


def calibration(spec: str, model, tokenizer, samples: int, seq_len: int) -> torch.Tensor:
    if spec == "gen":
        return generated_windows(model, tokenizer, samples, seq_len, seed=0)
    if not spec.startswith("s:"):
        raise ModelpressError(f"sampling {spec!r}: expected gen or s:t=X,r=N")
    options = dict(part.split("=") for part in spec[2:].split(","))
    uniform = round(float(options.get("u", 0)) * samples)
    temperature, random_first = float(options.get("t", 1)), int(options.get("r", 0))
    seed = int(options.get("seed", 0))
    if seed == 1:
        raise ModelpressError(f"sampling {spec!r}: seed 1 draws the in-domain evaluation windows")
    sampled = sample(model, tokenizer, samples - uniform, seq_len, seed, temperature, random_first)
    if not uniform:
        return sampled
    generator = torch.Generator().manual_seed(seed)
    vocab = ordinary_tokens(model, tokenizer)
    noise = vocab[torch.randint(len(vocab), (uniform, seq_len), generator=generator)]
    noise[:, 0] = start_token(tokenizer)
    return torch.cat([sampled, noise])


GPTQ_SETTINGS = {"damp": ("damp", float), "ts": ("true_sequential", lambda v: bool(int(v))),
                  "shrink": ("shrink_steps", int), "order": ("act_order", lambda v: bool(int(v))),
                  "fit": ("float_target", lambda v: bool(int(v)))}


@contextmanager
def awq_settings(gptq: dict, amax: float | None):
    """AWQ+GPTQ with GPTQ settings AWQConfig does not carry, and AWQ's exponents scaled into [0, amax):
    patched into the awq module for the duration of one build (an experiment, not an option)."""
    saved = awq_module.GPTQConfig, awq_module.candidate_scale
    if gptq:
        awq_module.GPTQConfig = partial(GPTQConfig, **gptq)
    if amax is not None:
        awq_module.candidate_scale = lambda mean_abs_x, alpha, weight_mean=None: \
            saved[1](mean_abs_x, alpha * amax, weight_mean)
    try:
        yield
    finally:
        awq_module.GPTQConfig, awq_module.candidate_scale = saved


def parse_method(method: str) -> tuple[str, dict, float | None, float, bool]:
    """METHOD -> (rtn | awq-gptq | awq-gptq-duo | gptq, GPTQConfig settings, AWQ's amax or None, decor, flat)."""
    head, *options = method.split("+")
    name, _, damp = head.partition("=")
    settings = dict(option.partition("=")[::2] for option in options)
    amax = settings.pop("amax", None)
    decor = float(settings.pop("decor", 0.0))
    flat = bool(int(settings.pop("flat", 0)))
    unknown = set(settings) - set(GPTQ_SETTINGS)
    if name == "rtn" and not settings and not damp and not decor and not flat:
        return name, {}, None, 0.0, False
    if (unknown or name not in ("awq-gptq", "awq-gptq-duo", "gptq") or (name == "gptq" and amax is not None)
            or not 0 <= decor <= 1):
        raise ModelpressError(f"method {method!r}: expected rtn, awq-gptq, awq-gptq-duo or gptq[=DAMP], "
                              f"then +KEY=VALUE settings among amax, decor (0..1), flat, {', '.join(GPTQ_SETTINGS)}")
    gptq = {GPTQ_SETTINGS[k][0]: GPTQ_SETTINGS[k][1](v) for k, v in settings.items()}
    if name == "gptq":
        gptq.setdefault("damp", float(damp or 0.1))
    return name, gptq, None if amax is None else float(amax), decor, flat


def split_rotation(method: str) -> tuple[str, RotateConfig | None]:
    """METHOD -> (METHOD without its +rot=KIND and +massive=X, the rotation to run first or None)."""
    head, *options = method.split("+")
    ours = [o for o in options if o.startswith(("rot=", "massive=", "heads=", "rseed=", "learn=", "lr="))]
    settings = dict(o.partition("=")[::2] for o in ours)
    if len(settings) != len(ours) or (settings and "rot" not in settings):
        raise ModelpressError(f"method {method!r}: +rot=KIND at most once, +massive=X, +heads=1, +rseed=N, +learn=N "
                              "and +lr=X only with it")
    rest = "+".join([head, *(o for o in options if o not in ours)])
    if "rot" not in settings:
        return rest, None
    massive = float(settings.get("massive", RotateConfig.massive))
    heads = bool(int(settings.get("heads", RotateConfig.heads)))
    seed = int(settings.get("rseed", RotateConfig.seed))
    learn = int(settings.get("learn", RotateConfig.learn_steps))
    rate = float(settings.get("lr", RotateConfig.learn_rate))
    return rest, RotateConfig(seed=seed, kind=settings["rot"], massive=massive, heads=heads, learn_steps=learn,
                              learn_rate=rate)      # checks the kind and the numbers


@contextmanager
def decorrelated(decor: float):
    """GPTQ's Hessians shrunk towards their diagonals for one build: (1 - decor) H + decor diag(H), patched into
    the gptq module's prepare_hessian (an experiment, not an option)."""
    original = gptq_module.prepare_hessian

    def shrunk(hessian, weight, damp, act_order):
        h = hessian * (1 - decor)
        h.diagonal().add_(decor * torch.diag(hessian))
        return original(h, weight, damp, act_order)

    if decor:
        gptq_module.prepare_hessian = shrunk
    try:
        yield
    finally:
        gptq_module.prepare_hessian = original


@contextmanager
def flat_search(flat: bool):
    """GPTQ's scale search with every column of a group weighed alike (no calibration statistics in the choice of
    range), patched into the gptq module's group_params for one build (an experiment, not an option)."""
    original = gptq_module.group_params
    if flat:
        gptq_module.group_params = lambda values, scheme, importance=None, shrink_steps=1: \
            original(values, scheme, None, shrink_steps)
    try:
        yield
    finally:
        gptq_module.group_params = original


def build(model, method: str, scheme: str, ids: torch.Tensor, device: str) -> None:
    method, rotation = split_rotation(method)
    if rotation is not None:
        log.info(rotate_residual(model, rotation, ids.to(device), scheme).summary())
    name, gptq, amax, decor, flat = parse_method(method)
    if name == "rtn":  # no calibration: the windows are not used (the baseline every calibrated row is read against)
        quantize_rtn(model, RTNConfig(scheme=scheme))
        return
    if name == "gptq":
        with decorrelated(decor), flat_search(flat):
            quantize_gptq(model, GPTQConfig(scheme=scheme, **gptq), ids, device=device)
        return
    config = AWQConfig(scheme=scheme, solver="gptq", duo_scaling=name.endswith("duo"))
    with awq_settings(gptq, amax), decorrelated(decor), flat_search(flat):
        quantize_awq(model, config, ids, device=device)


def split_cut(sampling: str) -> tuple[str, int]:
    """SAMPLING[@cut=N] -> (SAMPLING, N or 0)."""
    head, _, cut = sampling.partition("@")
    if not cut:
        return head, 0
    if not cut.startswith("cut=") or not cut[4:].isdigit():
        raise ModelpressError(f"sampling {sampling!r}: expected @cut=N after the samplings")
    return head, int(cut[4:])


def cached_windows(directory: str | None, key: str, make) -> torch.Tensor:
    """make(), kept as DIR/KEY.pt when a directory is given (and read from there when present)."""
    if directory is None:
        return make()
    path = Path(directory) / f"{key.replace('/', '_')}.pt"
    if path.exists():
        log.info("windows %s from %s", key, path)
        return torch.load(path, weights_only=True)
    ids = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids.clone(), path)     # a view of a whole tokenized corpus would save all of it
    return ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", metavar="SAMPLING/METHOD")
    p.add_argument("--scheme", default="int3-asym/g128")
    p.add_argument("--eval", nargs="+", default=["bible", "docs", "dialogue"], metavar="B")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows-cache", default=None, metavar="DIR", help="keep sampled windows in DIR and reuse them")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "cross_domain_sampling.json"), metavar="OUT")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    for variant in args.variants:
        parse_method(split_rotation(variant.partition("/")[2])[0])     # a typo fails before minutes of sampling
        for part in split_cut(variant.partition("/")[0])[0].split("&"):
            if part != "gen" and not part.startswith("s:"):
                raise ModelpressError(f"sampling {part!r} of {variant!r}: expected gen or s:t=X,r=N")
    start = time.perf_counter()
    base = load_model(None)
    model, tokenizer = base.model.float().eval().to(args.device), base.tokenizer
    cache = args.windows_cache
    evals = {"generated": cached_windows(cache, f"eval-{args.windows}x{args.seq_len}", lambda: generated_windows(
        model, tokenizer, args.windows, args.seq_len, seed=1))}
    for corpus in args.eval:   # cached too, so that a machine without the corpus packages scores the same windows
        evals[corpus] = cached_windows(cache, f"eval-{corpus}-{args.windows}x{args.seq_len}", lambda: prepare_windows(
            tokenizer, EvalSettings(text=corpus, windows=args.windows, seq_len=args.seq_len, speed=False))[1].eval)
    windows, rows = {}, []
    for variant in args.variants:   # each row is scored and saved as soon as it is built
        sampling, _, method = variant.partition("/")
        sampling, cut = split_cut(sampling)
        for part in sampling.split("&"):
            if part not in windows:
                windows[part] = cached_windows(cache, f"{part}-{args.samples}x{args.seq_len}", lambda: calibration(
                    part, model, tokenizer, args.samples, args.seq_len))
        calib = torch.cat([windows[part] for part in sampling.split("&")])
        if cut:   # end to end, cut again `cut` tokens later (the last window wraps round to the first sample)
            calib = calib.flatten().roll(-cut).view(calib.shape)
        # a rotation rewrites the embedding table in place: such a candidate shares nothing with the reference
        candidate = copy.deepcopy(model) if split_rotation(method)[1] is not None else shared_copy(model)
        built = time.perf_counter()
        build(candidate, method, args.scheme, calib, args.device)
        row = {"variant": variant, "scheme": args.scheme, "quantize_seconds": round(time.perf_counter() - built, 1)}
        candidate = materialize(candidate)
        for corpus, ids in evals.items():
            scores = score(model, {variant: candidate}, ids)
            fields = scores[variant].fields()
            row[corpus] = {"delta_perplexity": fields["perplexity"] / scores["float"].fields()["perplexity"] - 1,
                           "kl_divergence": fields["kl_divergence"]}
        row["worst_ratio"] = max(row[c]["delta_perplexity"] for c in args.eval) / row["generated"]["delta_perplexity"]
        rows.append(row)
        print(variant, " | ".join(f"{c} {row[c]['delta_perplexity']:+.1%} KL {row[c]['kl_divergence']:.3f}"
                                  for c in evals), f"| worst/in-domain {row['worst_ratio']:.2f}x", flush=True)
        write_json(Path(args.json), {"model": base.source, "device": args.device, "torch": torch.__version__,
                                     "python": platform.python_version(), "samples": args.samples,
                                     "windows": args.windows, "seq_len": args.seq_len, "rows": rows,
                                     "seconds": round(time.perf_counter() - start, 1)})
        del candidate
        release_memory()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
