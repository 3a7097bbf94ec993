"""`--to peft`: LoRA adapters in PEFT's layout, beside the float base they belong to.

    peft/adapter_config.json         peft_type LORA, r, lora_alpha, target_modules, base_model_name_or_path, ...
    peft/adapter_model.safetensors   base_model.model.<layer>.lora_A.weight (r, K), .lora_B.weight (N, r)
    peft/base/                       the hf export of the model without its adapters (export/hf.py)

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("out/peft/base"), "out/peft")

An adapter belongs to the weights it was trained on. Adapters trained on a quantized base (QLoRA) learned
to correct that base's rounding, so their base is the dequantized quantized model, not the original float
one: base/ holds it. Only when every adapted layer is a float layer of an unchanged float model that
transformers loads (a directory or hub id, not a GGUF file) does the config point at that model instead.
The adapters come from the model (LoRALinear layers) or, for a model saved by `finetune --lora --merge
none`, from the adapters file beside it; adapters already merged into a saved model cannot be taken apart.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.export.base import ExportOptions, ExportResult, LayerExport, folder_bytes, register_exporter
from modelpress.export.hf import hf_dtype, write_hf, written_files
from modelpress.io.model import MODELPRESS_FILE, LoadedModel, is_causal_lm
from modelpress.nn.layers import is_conv1d
from modelpress.nn.registry import compressed_module_kind
from modelpress.train.lora import ADAPTERS_FILE, LoRALinear, load_adapters, lora_layers, unwrap_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_DIR = "base"
KEY_PREFIX = "base_model.model."   # PeftModel -> LoraModel -> the transformers model


def saved_adapters(source: str) -> Path | None:
    """The adapters file kept beside a saved modelpress model, if it still matches the saved base."""
    folder = Path(source)
    file = folder / ADAPTERS_FILE
    if not (file.is_file() and (folder / MODELPRESS_FILE).is_file()):
        return None
    from modelpress.io.save import read_metadata

    merge = read_metadata(folder).get("report", {}).get("merge")
    if merge not in (None, "none"):
        raise ModelpressError(f"{folder}: the adapters in {ADAPTERS_FILE} were merged into the saved model "
                              f"(--merge {merge}), so the base they were trained on is gone; run finetune with "
                              f"--merge none to export PEFT adapters")
    return file


@contextlib.contextmanager
def attached_adapters(loaded: LoadedModel) -> Iterator[dict[str, LoRALinear]]:
    """The model's LoRA adapters; those of a saved model's adapters file are attached for the block only."""
    adapters = lora_layers(loaded.model)
    if adapters:
        yield adapters
        return
    file = saved_adapters(loaded.source)
    if file is None:
        raise ModelpressError(f"{loaded.source} has no LoRA adapters to export: attach them with "
                              f"train.lora.add_lora, or save them with `modelpress finetune --lora --merge none`")
    load_adapters(loaded.model, file)
    try:
        yield lora_layers(loaded.model)
    finally:
        unwrap_lora(loaded.model)


def unchanged_float_source(loaded: LoadedModel, adapters: dict[str, LoRALinear]) -> str | None:
    """The float model transformers loads that the adapters sit on unchanged, or None (base/ is written)."""
    if loaded.source != loaded.float_source or loaded.source.endswith(".gguf"):
        return None
    if any(compressed_module_kind(m) is not None for m in loaded.model.modules()):
        return None
    if not all(type(a.base) is nn.Linear or is_conv1d(a.base) for a in adapters.values()):
        return None
    return loaded.source


def target_modules(model: nn.Module, adapters: dict[str, LoRALinear]) -> list[str]:
    """Last name parts (q_proj, ...) when they pick out exactly the adapted layers, else the full names."""
    leaves = {name.rsplit(".", 1)[-1] for name in adapters}
    picked = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if picked == set(adapters) else sorted(adapters)


def adapter_config(model: nn.Module, adapters: dict[str, LoRALinear], base: str) -> dict:
    settings = Counter((a.rank, a.alpha) for a in adapters.values())
    (rank, alpha), _ = settings.most_common(1)[0]
    others = {name: a for name, a in adapters.items() if (a.rank, a.alpha) != (rank, alpha)}
    conv1d = {is_conv1d(a.base) for a in adapters.values()}
    if len(conv1d) > 1:
        raise ModelpressError("adapters sit on both Linear and Conv1D layers; PEFT's fan_in_fan_out is one setting")
    dropouts = {a.dropout.p if isinstance(a.dropout, nn.Dropout) else 0.0 for a in adapters.values()}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if is_causal_lm(model.config) else None,
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(n): a.rank for n, a in others.items() if a.rank != rank},
        "alpha_pattern": {re.escape(n): a.alpha for n, a in others.items() if a.alpha != alpha},
        "lora_dropout": max(dropouts),
        "target_modules": target_modules(model, adapters),
        "fan_in_fan_out": conv1d.pop(),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "revision": None,
    }


def write_adapters(model: nn.Module, adapters: dict[str, LoRALinear], folder: Path, base: str) -> list[LayerExport]:
    tensors = {}
    layers = []
    for name, adapter in adapters.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = adapter.lora_a.detach().float().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = adapter.lora_b.detach().float().cpu().contiguous()
        source = f"lora r={adapter.rank} {str(adapter.lora_a.dtype).removeprefix('torch.')}"
        layers.append(LayerExport(f"{name}.lora", source, "lora_A/lora_B float32", lossless=True))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = adapter_config(model, adapters, base)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
    return layers


@register_exporter("peft")
def export_peft(loaded: LoadedModel, folder: Path, options: ExportOptions) -> ExportResult:
    dtype = hf_dtype(options.hf_dtype)
    notes: list[str] = []
    with attached_adapters(loaded) as adapters:
        source = unchanged_float_source(loaded, adapters)
        layers, runtime = [], {}
        if source is None:
            base = write_hf(loaded, folder / BASE_DIR, dtype, adapters="drop")
            layers, runtime, notes = base.layers, base.runtime_weights, base.notes
            notes.append(_base_note(adapters, dtype, loaded.float_source))
        else:
            notes.append(f"base: the float model {source}, unchanged (no base/ written)")
        layers += write_adapters(loaded.model, adapters, folder, BASE_DIR if source is None else source)
    # re-rounded bases are measured with the adapters on, where they still are (the KL runs after this returns)
    attached = lora_layers(loaded.model)
    runtime = {(f"{name}.base" if name in attached else name): w for name, w in runtime.items()}
    return ExportResult(target="peft", files=written_files(folder), layers=layers, file_bytes=folder_bytes(folder),
                        linear_bits_per_weight=float(dtype.itemsize * 8), notes=notes, runtime_weights=runtime)


def _base_note(adapters: dict[str, LoRALinear], dtype, float_source: str) -> str:
    schemes = sorted({a.base.scheme.spec for a in adapters.values() if hasattr(a.base, "scheme")})
    where = f"{BASE_DIR}/ ({str(dtype).removeprefix('torch.')}; base_model_name_or_path is relative to this folder)"
    if schemes:
        return (f"the adapters were trained on a quantized base ({', '.join(schemes)}): {where} holds that base "
                f"dequantized, which is what they belong to, not the original float model {float_source}")
    return f"base: {where}, the model the adapters were trained on, without them"
