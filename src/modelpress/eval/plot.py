"""Quality against bits per weight, one point per format: the picture that decides a format."""

from __future__ import annotations

from collections.abc import Sequence

from modelpress.io.atomic import atomic_file


def plot_quality_vs_bits(rows: Sequence[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("bits_per_weight") is not None]
    floats = [r for r in rows if r.get("bits_per_weight") is None]
    fig, (ax_kl, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in points:
        for ax, key in ((ax_kl, "kl_divergence"), (ax_ppl, "perplexity")):
            ax.scatter(row["bits_per_weight"], row[key], s=30)
            ax.annotate(row["format"], (row["bits_per_weight"], row[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for row in floats:
        ax_ppl.axhline(row["perplexity"], color="gray", linestyle="--", linewidth=1, label=f"{row['format']} PPL")
    ax_kl.set_yscale("log")
    ax_kl.set_xlabel("bits per weight (quantized layers, scales included)")
    ax_kl.set_ylabel("KL divergence vs float (nats/token)")
    ax_ppl.set_xlabel("bits per weight (quantized layers, scales included)")
    ax_ppl.set_ylabel("perplexity")
    if floats:
        ax_ppl.legend(fontsize=8)
    fig.suptitle("quality against size")
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
