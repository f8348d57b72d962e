"""Figures of the fragmentation lab, drawn with matplotlib (imported inside the functions).

``pagedkv`` never imports this module itself; ``pagedkv frag`` does, unless ``--no-plot``.
"""

from __future__ import annotations

from pathlib import Path

from ._optional import require

#: Colours of the four breakdown parts (colour-blind safe: Okabe-Ito).
COLORS = {"token_states": "#0072B2", "reserved": "#E69F00", "internal": "#D55E00", "external": "#999999"}
NAMES = {"token_states": "token states", "reserved": "reserved", "internal": "internal frag.",
         "external": "external frag. & other"}


def _pyplot():
    matplotlib = require("matplotlib", "drawing the plot (or pass --no-plot)")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "drawing the plot (or pass --no-plot)")


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_frag(report: dict, path: str | Path) -> Path:
    """Draw the ``pagedkv frag`` report: breakdown bars and concurrency vs page size.

    Args:
        report: the dict ``pagedkv.commands.frag.sweep`` returns (or its JSON).
        path: the PNG to write.

    Returns:
        The path written.

    Raises:
        BackendUnavailable: matplotlib is not installed.
    """
    plt = _pyplot()
    points = report["points"]
    static = [p for p in points if p["kind"] == "static"]
    paged = [p for p in points if p["kind"] == "paged"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.6, 1]})

    labels = [p["label"] for p in static] + [str(p["page_size"]) for p in paged]
    x = list(range(len(static))) + [len(static) + 0.6 + i for i in range(len(paged))]
    bottom = [0.0] * len(points)
    ordered = static + paged
    for part, color in COLORS.items():
        values = [100 * p["breakdown"][part] for p in ordered]
        ax1.bar(x, values, bottom=bottom, color=color, width=0.8, label=NAMES[part], edgecolor="white", linewidth=0.5)
        bottom = [b + v for b, v in zip(bottom, values)]
    for xi, p in zip(x, ordered):
        share = 100 * p["breakdown"]["token_states"]
        inside = share >= 10
        ax1.text(xi, share - 1.5 if inside else share + 1.5, f"{share:.0f}%", ha="center",
                 va="top" if inside else "bottom", fontsize=8.5, fontweight="bold",
                 color="white" if inside else "black")
    ax1.set_xticks(x)
    ax1.set_xticklabels(labels)
    ax1.set_ylim(0, 100)
    ax1.set_ylabel("share of the KV-cache pool (%)")
    groups = []
    if static:
        groups.append((sum(x[:len(static)]) / len(static), f"static ({static[0]['placement'].replace('_', '-')})"))
    if paged:
        groups.append((sum(x[len(static):]) / len(paged), "paged: page size (tokens)"))
    for gx, text in groups:
        ax1.annotate(text, (gx, 0), xytext=(0, -30), textcoords="offset points", ha="center",
                     va="top", fontsize=10, annotation_clip=False)
    ax1.set_title("Where the slots go (mean over steps with a waiting queue)", fontsize=11)
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False, fontsize=9)

    if paged:
        sizes = [p["page_size"] for p in paged]
        ax2.plot(sizes, [p["mean_running"] for p in paged], "o-", color=COLORS["token_states"], label="paged")
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(sizes)
        ax2.set_xticklabels([str(s) for s in sizes])
        ax2.set_xlabel("page size (tokens)")
    styles = ["--", "-.", ":"]
    for i, p in enumerate(static):
        ax2.axhline(p["mean_running"], linestyle=styles[i % 3], color="#555555", linewidth=1.3,
                    label=f"static {p['label']}")
    ax2.set_ylim(0, None)
    ax2.set_ylabel("mean running requests")
    ax2.set_title("Concurrency under the same budget", fontsize=11)
    ax2.grid(True, alpha=0.3)
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False, fontsize=9)

    w, b, c = report["workload"], report["budget"], report["config"]
    fig.suptitle(f"{w['name']}: {w['num_requests']} requests, {b['num_slots']:,} slots, max_len {c['max_len']}"
                 + (f", {c['parallel_samples']} samples/request" if c["parallel_samples"] > 1 else ""), fontsize=12)
    return _save(plt, fig, path)


def plot_prefix(report: dict, path: str | Path) -> Path:
    """Draw the prefix hit rate against capacity (log axis), one line per page size, from a
    ``pagedkv frag --prefix-caching --capacities ...`` report."""
    plt = _pyplot()
    points = report["capacity_sweep"]
    fig, ax = plt.subplots(figsize=(7, 4.6))
    palette = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#999999"]
    cpus = sorted({p.get("cpu_slots", 0) for p in points})
    for i, ps in enumerate(sorted({p["page_size"] for p in points})):
        for j, cpu in enumerate(cpus):
            line = sorted((p["num_slots"], 100 * p["prefix_hit_rate"]) for p in points
                          if p["page_size"] == ps and p.get("cpu_slots", 0) == cpu)
            label = f"page {ps}" + (f", CPU tier {cpu:,} slots" if cpu else (", no CPU tier" if len(cpus) > 1 else ""))
            ax.plot([c for c, _ in line], [h for _, h in line], "o-" if not cpu else "s--",
                    color=palette[i % len(palette)], alpha=1.0 - 0.5 * j / max(1, len(cpus) - 1) if cpu else 1.0,
                    label=label)
    ax.set_xscale("log")
    ax.set_ylim(0, 100)
    ax.set_xlabel("KV-cache capacity (token slots, log scale)")
    ax.set_ylabel("prefix hit rate (% of prompt tokens)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(frameon=False)
    w = report["workload"]
    ax.set_title(f"{w['name']}: {w['num_requests']} requests, prefix cache hit rate vs capacity", fontsize=11)
    return _save(plt, fig, path)


__all__ = ["plot_frag", "plot_prefix"]
