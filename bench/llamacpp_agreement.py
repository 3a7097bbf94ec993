"""Perplexity agreement with llama.cpp's `llama-perplexity` (issue 16 item 2), on the default model as shipped
(its tokenizer adds no BOS) and with its tokenizer set to add a BOS (the GGUF then says so too).

Each model is quantized to int8/g32 (Q8_0 blocks, exported bit for bit), exported to GGUF, and scored by
llama-perplexity (`-c SEQ_LEN --chunks WINDOWS`, second half of each window) and by `modelpress.evaluate` on
the same text file, second-half scoring, under each BOS window rule (io/text.py: "overwrite" is llama.cpp's,
"prepend" puts the BOS before the text; without a BOS both are the same windows).

    PYTHONPATH=src python bench/llamacpp_agreement.py --json bench/results/llamacpp_agreement.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

import modelpress
from modelpress.api import EvalSettings
from modelpress.export import export_model, llamacpp
from modelpress.export.gguf import GGUF_FILE
from modelpress.io.model import load_model
from modelpress.io.text import BOS_MODES, load_text, tokenizer_bos


def agreement(base, bos: bool, text: Path, windows: int, seq_len: int, threads: int, work: Path) -> list[dict]:
    loaded = copy.deepcopy(base)
    if bos:
        loaded.tokenizer.add_bos_token = True
    modelpress.quantize(loaded, modelpress.RTN("int8/g32"))
    export_model(loaded, ["gguf"], work / f"bos{int(bos)}")
    gguf = work / f"bos{int(bos)}" / "gguf" / GGUF_FILE
    start = time.perf_counter()
    theirs = llamacpp.perplexity(gguf, text, seq_len, windows, threads=threads)
    their_seconds = time.perf_counter() - start
    exported = load_model(str(gguf))
    rows = []
    for mode in BOS_MODES if tokenizer_bos(exported.tokenizer) is not None else BOS_MODES[:1]:
        settings = EvalSettings(windows=windows, seq_len=seq_len, speed=False, score="second-half", bos_mode=mode,
                                text=str(text))
        ours = modelpress.evaluate(exported, text=str(text), settings=settings)
        rows.append({"tokenizer_adds_bos": bos, "bos_mode": mode if bos else "-", "llama_cpp": theirs,
                     "modelpress": ours.perplexity, "relative_difference": ours.perplexity / theirs - 1,
                     "llama_cpp_seconds": round(their_seconds, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_model(None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="llamacpp-agreement-") as tmp:
        text = Path(tmp) / "text.txt"
        text.write_text(load_text(None).text)
        for bos in (False, True):
            rows += agreement(base, bos, text, args.windows, args.seq_len, args.threads, Path(tmp))
    for r in rows:
        print(f"BOS {str(r['tokenizer_adds_bos']):5}  rule {r['bos_mode']:9}  llama.cpp {r['llama_cpp']:.4f}  "
              f"modelpress {r['modelpress']:.4f}  {100 * r['relative_difference']:+.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": base.source, "windows": args.windows, "seq_len": args.seq_len,
                                               "weights": "Q8_0 (int8/g32)", "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
