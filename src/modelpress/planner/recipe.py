"""A plan written as a recipe: YAML whose stages are config fields, for `modelpress compress`.

    # forecast and budget as comments
    model: <where the model came from>
    stages:
      - quantize:                  # the stage kind
          method: rtn              # a registered quantization method (algorithms/quantize registry)
          scheme: int4/g32         # then that method's config fields, as YAML values:
          skip: [lm_head]          #   tuples as lists, WeightSchemes as spec strings
          schemes:                 #   the per-layer map: layer name -> scheme spec
            model.layers.0.self_attn.q_proj: int5/g32
      - export:                    # only for a runtime reached through an export (llamacpp, transformers)
          targets: [gguf]

Each stage is a one-key mapping {kind: {field: value}}; `method` picks the config type and every other key
is a field of it, so a recipe loader builds the config with `config_for_method(method, scheme, **rest)` after
turning spec strings back into WeightSchemes (the `schemes` values too). Written atomically.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from modelpress.io.atomic import atomic_file


def recipe_stages(plan) -> list[dict]:
    quantize = {"method": plan.method, "scheme": plan.scheme, "skip": list(plan.skip),
                "schemes": dict(sorted(plan.schemes.items()))}
    stages = [{"quantize": quantize}]
    from modelpress.planner.runtimes import runtime

    target = runtime(plan.runtime).export_target
    if target is not None:
        stages.append({"export": {"targets": [target]}})
    return stages


def write_recipe(plan, path: str | Path) -> Path:
    f = plan.forecast
    header = [f"# modelpress plan for {plan.runtime}: {plan.method}, budget {_budget(plan.budget)}",
              f"# forecast: {f.weight_bytes} weight bytes ({f.bits_per_weight:.4f} bits/weight over quantized "
              f"layers), KL {f.kl_divergence:.4f} ({f.kl_basis}),",
              f"#           {f.seconds:.1f} s and {f.peak_memory_bytes / 2**20:.0f} MiB peak memory on the "
              f"planning machine"]
    body = yaml.safe_dump({"model": plan.model, "stages": recipe_stages(plan)}, sort_keys=False,
                          default_flow_style=None, width=120)
    with atomic_file(path) as handle:
        handle.write("\n".join(header) + "\n" + body)
    return Path(path)


def _budget(budget: dict) -> str:
    return ", ".join(f"{key.replace('_', '-')} {value}" for key, value in budget.items() if value is not None)
