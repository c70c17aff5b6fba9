"""Generality against locality for each method row of a ``benchmarks/edit.py`` results JSON.

An edit method trades one for the other (a stronger edit reaches more rephrasings and moves more
unrelated answers), so a single table row cannot say whether one method beats another: this
plot shows each row as a point, one panel per language pair, the edited language filled and
English hollow, with the issue's single-edit targets as dashed lines. FT-L rows that differ only
in ``norm_constraint`` are joined in order, tracing the baseline's trade-off curve (one curve per
setting of the rest, e.g. per ``objective``).

    python benchmarks/plot_edit.py benchmarks/results/edit_gemma3-270m_single_4lang20_ftl_constraints.json \\
        --out docs/figures/edit_lafn_vs_ftl.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from edit import is_ftl, overrides  # noqa: E402  (benchmarks/edit.py: how its rows are named)

TARGETS = {"generality": 0.80, "locality": 0.95}  # issue 5, single edits


def constraint(method: str) -> float:
    """An FT-L row's norm constraint (inf: unconstrained), for ordering its curve."""
    value = dict(overrides(method)).get("norm_constraint", "none")
    return float("inf") if value.lower() == "none" else float(value)


def curve_of(method: str) -> str:
    """The FT-L curve a row lies on: its name without the ``norm_constraint`` piece."""
    return "@".join([method.split("@")[0]] + [f"{key}={value}" for key, value in overrides(method)
                                               if key != "norm_constraint"])


def ftl_curves(per_method: dict, lang: str) -> dict[str, list[tuple[float, float]]]:
    """{curve: FT-L's (generality, locality) points in ``lang``, in norm-constraint order}."""
    ftl = sorted(filter(is_ftl, per_method), key=constraint)
    out: dict = {}
    for m in ftl:
        if lang in per_method[m]:
            out.setdefault(curve_of(m), []).append(per_method[m][lang])
    return out


def points(rows, protocol):
    """{pair: {method: {lang: (generality, locality)}}} of ``protocol``'s rows."""
    out: dict = {}
    for r in rows:
        if r["protocol"] == protocol:
            out.setdefault(r["pair"], {}).setdefault(r["method"], {})[r["lang"]] = (
                r["generality"]["acc"], r["locality"]["acc"])
    return out


def locality_at(generality: float, curve) -> float | None:
    """The best locality a trade-off curve [(generality, locality), ...] (in constraint order)
    reaches at ``generality``: its points there and its segments through there, linear between
    their ends. None when the curve never has that generality."""
    there = [loc for gen, loc in curve if gen == generality]
    for (g0, l0), (g1, l1) in zip(curve, curve[1:]):
        if g0 != g1 and min(g0, g1) <= generality <= max(g0, g1):
            there.append(l0 + (l1 - l0) * (generality - g0) / (g1 - g0))
    return max(there) if there else None


def comparison(rows, method="lafn", protocol="single") -> list[str]:
    """Markdown rows: ``method``'s generality and locality per language, and each FT-L curve's
    locality at the same generality (what FT-L gives up to edit as widely; '-': that curve never
    reaches this generality)."""
    data = points(rows, protocol)
    curves = sorted({curve_of(m) for per in data.values() for m in filter(is_ftl, per)})
    lines = [f"| pair | lang | {method} generality | {method} locality | "
             + " | ".join(f"{c} locality there" for c in curves) + " |",
             "|---|---|---:|---:|" + "---:|" * len(curves)]
    for pair, per_method in sorted(data.items()):
        for lang, (gen, loc) in sorted(per_method.get(method, {}).items()):
            on = ftl_curves(per_method, lang)
            there = [locality_at(gen, on.get(c, [])) for c in curves]
            lines.append(f"| {pair} | {lang} | {gen:.3f} | {loc:.3f} | "
                         + " | ".join("-" if t is None else f"{t:.3f}" for t in there) + " |")
    return lines


def plot(rows, protocol="single", title=""):
    data = points(rows, protocol)
    if not data:
        raise SystemExit(f"no {protocol} rows to plot")
    cols = min(2, len(data))
    nrows = -(-len(data) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.8 * nrows), sharex=True, sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(data):]:
        ax.set_visible(False)
    methods = sorted({m for per in data.values() for m in per})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for ax, (pair, per_method) in zip(axes.flat, sorted(data.items())):
        lang = pair.split("+")[1]
        for which, hollow in ((lang, False), ("en", True)):
            for curve in ftl_curves(per_method, which).values():
                if len(curve) > 1:
                    ax.plot(*zip(*curve), color="0.6", lw=1, ls=":" if hollow else "-", zorder=1)
            for m, per_lang in per_method.items():
                if which in per_lang:
                    ax.scatter(*per_lang[which], s=40, zorder=2, edgecolors=colors[m],
                               facecolors="none" if hollow else colors[m],
                               label=m if not hollow else None)
        ax.axvline(TARGETS["generality"], color="k", ls="--", lw=0.7)
        ax.axhline(TARGETS["locality"], color="k", ls="--", lw=0.7)
        ax.set(title=f"{pair} (filled: {lang}, hollow: en)", xlim=(0, 1.03), ylim=(0, 1.03))
    for ax in axes[-1]:
        ax.set_xlabel("generality")
    for ax in axes[:, 0]:
        ax.set_ylabel("locality")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(title or f"{protocol} edits: generality vs locality")
    fig.tight_layout()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)
    return fig


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="A benchmarks/edit.py results JSON.")
    ap.add_argument("--protocol", default="single")
    ap.add_argument("--title", default="")
    ap.add_argument("--out", required=True, help="PNG to write.")
    args = ap.parse_args()
    rows = json.loads(Path(args.results).read_text())["rows"]
    plot(rows, args.protocol, args.title).savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"wrote {args.out}")
    print("\n".join(comparison(rows, protocol=args.protocol)))


if __name__ == "__main__":
    main()
