"""Bench plots (``bench.plots=true``): PNG files next to the JSON, for people who would rather look than read.

* ``<name>.speedup.png`` — speedup vs ``hf`` per category (grouped bars, one per method) and overall;
* ``<name>.acceptance.png`` — for each speculative method, the fraction of verify steps whose accepted path
  reached depth d (d = 1, 2, ...), with τ in the legend.

matplotlib is an optional dependency (``pip install 'specdec[bench]'``; ``make`` installs it); it runs headless.
"""

from __future__ import annotations

from pathlib import Path

from specdec.errors import ConfigError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("bench.plots=true needs matplotlib: pip install 'specdec[bench]' (or matplotlib).") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(result: dict, json_path: str | Path) -> list[Path]:
    """Write the plots of a bench result beside ``json_path``; returns their paths."""
    plt = _pyplot()
    base = Path(json_path).with_suffix("")
    runs = result["runs"]
    out = []

    categories = sorted({c for r in runs for c in r["per_category"]})
    labels = categories + ["overall"]
    fig, ax = plt.subplots(figsize=(min(12, max(6, 1 + 0.2 * len(labels) * max(1, len(runs)))), 5))
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        ys = [(r["per_category"].get(c) or {}).get("speedup_vs_hf") for c in categories] + [r["speedup_vs_hf"]]
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [y or 0 for y in ys], width, label=r["method"])
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(labels))], labels, rotation=30, ha="right")
    ax.set_ylabel("speedup vs hf")
    title = f"{result['target']} ({result['dtype']}, {result['threads']} threads, {result['prompts']} prompts"
    ax.set_title(title + (f", batch {result['batch_size']})" if result.get("batch_size", 1) > 1 else ")"))
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(base.with_name(base.name + ".speedup.png"))
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        depth = r.get("acceptance_by_depth")
        if depth:
            ax.plot(range(1, len(depth) + 1), depth, marker="o", label=f"{r['method']} (tau {r['tau']:.2f})")
    ax.set_xlabel("depth d")
    ax.set_ylabel("fraction of verify steps accepting depth d")
    ax.set_ylim(0, 1)
    ax.set_title("acceptance by depth")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(base.with_name(base.name + ".acceptance.png"))
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)
    return out
