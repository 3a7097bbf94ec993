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


def plot_kl_vs_bits(rows: Sequence[dict], path: str, series_key: str = "library", label_key: str = "key",
                    title: str | None = None) -> None:
    """KL divergence (log scale) against measured bits per weight, one colour per `series_key` value
    (e.g. the library that quantized the row), each point labelled with `label_key`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("bits_per_weight") is not None and r.get("kl_divergence")]
    fig, ax = plt.subplots(figsize=(11, 6.5))
    markers = "osD^vP*X"
    for i, series in enumerate(dict.fromkeys(str(r.get(series_key)) for r in points)):
        mine = [r for r in points if str(r.get(series_key)) == series]
        ax.scatter([r["bits_per_weight"] for r in mine], [r["kl_divergence"] for r in mine], s=28,
                   marker=markers[i % len(markers)], label=series)
        for r in mine:
            ax.annotate(str(r.get(label_key, "")), (r["bits_per_weight"], r["kl_divergence"]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized layers, scales and zeros included)")
    ax.set_ylabel("KL divergence vs float (nats/token)")
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)


def plot_stages(rows: Sequence[dict], path: str) -> None:
    """A pipeline's stages in order (the float model first): weight bytes and KL divergence after each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    x = list(range(len(rows)))
    fig, (ax_size, ax_kl) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_size.bar(x, [r["weight_bytes"] / 2**20 for r in rows], color="tab:blue")
    ax_size.set_ylabel("weights (MiB, as stored)")
    kl = [(i, r["kl_divergence"]) for i, r in zip(x, rows) if r.get("kl_divergence") is not None]
    ax_kl.plot([i for i, _ in kl], [v for _, v in kl], marker="o", color="tab:red")
    ax_kl.set_ylabel("KL divergence vs float (nats/token)")
    for ax in (ax_size, ax_kl):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    fig.suptitle("size and quality after each stage")
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
