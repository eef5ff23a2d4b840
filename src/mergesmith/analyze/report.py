"""The analysis as pictures and a page: OUT/*.png, OUT/report.md and OUT/report.html (the
plots embedded, one file to send) from summary.json."""

from __future__ import annotations

import base64
import html as html_lib
import re
from pathlib import Path

from mergesmith.evaluate.plots import _pyplot, _save


def write_report(summary: dict, out: Path) -> Path:
    """Draw the plots and write report.md and report.html beside them; return report.md's path."""
    names = short_names(summary["experts"])
    plots = [plot_layers(summary, names, out / "layers.png"),
             plot_similarity(summary, names, out / "similarity.png"),
             plot_drops(summary, names, out / "drops.png")]
    if summary["spectra"]:
        plots.append(plot_spectra(summary, names, out / "spectra.png"))
    if summary["merged"]:
        plots.append(plot_merged(summary, names, out / "merged.png"))
    content = blocks(summary, names, [p.name for p in plots])
    (out / "report.html").write_text(html(content, images=out))
    path = out / "report.md"
    path.write_text(markdown(content))
    return path


def short_names(labels: list[str]) -> list[str]:
    """Each model's folder name (its label when two share one)."""
    short = [Path(label).name or label for label in labels]
    return short if len(set(short)) == len(short) else labels


def _layers(summary: dict) -> tuple[list[str], list[dict]]:
    keys = list(summary["layers"])
    return keys, [summary["layers"][k] for k in keys]


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def plot_layers(summary: dict, names: list[str], path: Path) -> Path:
    """Per layer: ‖τi‖, pairwise cosines, sign conflicts and mask overlap, effective rank."""
    plt = _pyplot()
    keys, layers = _layers(summary)
    x = range(len(keys))
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    (norm_ax, cos_ax), (conflict_ax, rank_ax) = axes
    for i, name in enumerate(names):
        norm_ax.plot(x, [f["norms"][i] for f in layers], marker=".", label=name)
        if layers[0].get("mean_effective_rank"):
            rank_ax.plot(x, [f.get("mean_effective_rank", [None] * len(names))[i] for f in layers],
                         marker=".", label=name)
    if summary["merged"]:
        norm_ax.plot(x, [f["merged"]["norm"] for f in layers], "k--", label="merged δ")
    for i, j in _pairs(len(names)):
        label = f"{names[i]}·{names[j]}"
        cos_ax.plot(x, [f["cosine"][i][j] for f in layers], marker=".", label=label)
        conflict_ax.plot(x, [f["jaccard"][i][j] for f in layers], marker=".",
                         label=f"top-k overlap {label}")
    conflict_ax.plot(x, [f["sign_conflict_rate"] for f in layers], "k-", marker=".",
                     label="sign conflicts (any pair)")
    titles = ("task-vector norm ‖τi‖", "cosine similarity",
              "sign conflicts / Jaccard of top-k masks", "mean effective rank (2-D tensors)")
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xticks(list(x), keys, rotation=90, fontsize=7)
        ax.set_xlabel("layer")
    return _save(fig, plt, path)


def plot_similarity(summary: dict, names: list[str], path: Path) -> Path:
    """The whole model's cosine and top-k overlap matrices."""
    plt = _pyplot()
    model = summary["model"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(names), 2 + 0.8 * len(names)))
    titles = ("cosine of τi, τj", "Jaccard of top-k masks")
    for ax, key, title in zip(axes, ("cosine", "jaccard"), titles):
        matrix = [[v if v is not None else float("nan") for v in row] for row in model[key]]
        image = ax.imshow(matrix, vmin=-1 if key == "cosine" else 0, vmax=1, cmap="coolwarm")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=45)
        ax.set_yticks(range(len(names)), names)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, plt, path)


def plot_drops(summary: dict, names: list[str], path: Path) -> Path:
    """Per method, the share of each τi's entries and of its energy ‖τi‖² it would drop."""
    plt = _pyplot()
    dropped = summary["model"]["dropped"]
    methods = list(dropped)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    width = 0.8 / len(names)
    for ax, what in zip(axes, ("entries", "energy")):
        for i, name in enumerate(names):
            values = [dropped[m][what][i] or 0 for m in methods]
            ax.bar([k + i * width for k in range(len(methods))], values, width, label=name)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(methods))], methods)
        ax.set_title(f"share of {'entries' if what == 'entries' else 'energy ‖τ‖²'} dropped")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    return _save(fig, plt, path)


def plot_spectra(summary: dict, names: list[str], path: Path) -> Path:
    """Singular values σk/σ1 of the middle layer's matrices, one panel each."""
    plt = _pyplot()
    spectra = summary["spectra"]
    cols = min(4, len(spectra))
    rows = -(-len(spectra) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 3 * rows), squeeze=False)
    labels = names + (["merged δ"] if summary["merged"] else [])
    for ax, (tensor, sigmas) in zip(axes.flat, spectra.items()):
        for label, sigma in zip(labels, sigmas):
            if sigma and sigma[0] > 0:
                ax.semilogy(range(1, len(sigma) + 1), [s / sigma[0] for s in sigma], label=label)
        ax.set_title(tensor.split(".", 2)[-1] if tensor.count(".") > 2 else tensor, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(spectra):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("singular values σk / σ1 (middle layer)")
    return _save(fig, plt, path)


def plot_merged(summary: dict, names: list[str], path: Path) -> Path:
    """Per layer: cos(δ, τi), δ's coefficients on the τi, and the share of δ outside their span."""
    plt = _pyplot()
    keys, layers = _layers(summary)
    x = range(len(keys))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True)
    for i, name in enumerate(names):
        axes[0].plot(x, [f["merged"]["cosine"][i] for f in layers], marker=".", label=name)
        axes[1].plot(x, [f["merged"]["coefficients"][i] for f in layers], marker=".", label=name)
    axes[2].plot(x, [f["merged"]["residual"] for f in layers], "k-", marker=".")
    for ax, title in zip(axes, ("cos(δ, τi)", "δ ≈ Σ ci τi: coefficients ci",
                                "share of ‖δ‖² outside span(τi)")):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_xticks(list(x), keys, rotation=90, fontsize=7)
    axes[0].legend(fontsize=7)
    return _save(fig, plt, path)


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def blocks(summary: dict, names: list[str], plots: list[str]) -> list[tuple]:
    """The report's content, written once for both pages: ("h", level, text), ("p", text),
    ("table", header, rows), ("img", file name), ("ul", items); text may hold **bold** and
    `code`."""
    model = summary["model"]
    n = len(names)
    parts = [
        ("h", 1, "Merge analysis"),
        ("p", f"Recipe `{summary['recipe']}` ({summary['merge_method']}; densities and weights "
              f"as {summary['parameters_of']}'s: {summary['densities']}), base "
              f"`{summary['base']}`, {summary['tensors']} tensors ({summary['elements']:,} "
              f"entries), {summary['seconds']:.1f} s. Spectra: all singular values up to "
              f"{summary['max_rank']} + 10, else the top {summary['max_rank']} (randomized SVD; "
              f"the effective rank is then that of the top {summary['max_rank']}, at most "
              f"{summary['max_rank']}; the stable rank ‖τ‖²/σ1² is exact)."),
        ("h", 2, "Task vectors"),
        ("table", ["model", "‖τ‖", "mean effective rank", "mean stable rank"],
         [[names[i], _f(model["norms"][i]),
           _f((model.get("mean_effective_rank") or [None] * n)[i]),
           _f((model.get("mean_stable_rank") or [None] * n)[i])] for i in range(n)]),
        ("p", f"Sign conflicts (entries where some τi > 0 and some τj < 0): "
              f"**{model['sign_conflict_rate']:.2%}** of the entries."),
        ("h", 3, "Cosine similarity / Jaccard of the top-k masks / pairwise sign conflicts"),
        ("table", ["pair", "cosine", "Jaccard", "sign conflicts"],
         [[f"{names[i]} · {names[j]}", _f(model["cosine"][i][j]), _f(model["jaccard"][i][j]),
           f"{model['pair_conflict_rate'][i][j]:.2%}"] for i, j in _pairs(n)]),
        ("h", 2, "What sparsification would drop"),
        ("p", "Share of each τi's non-zero entries / of its energy ‖τi‖² dropped (ties_elect: "
              "after TIES' trim and sign election; dare and della: the draws a merge with this "
              "seed makes, before rescaling; della only for a DELLA recipe)."),
        ("table", ["method", *names],
         [[m, *[f"{_f(d['entries'][i])} / {_f(d['energy'][i])}" for i in range(n)]]
          for m, d in model["dropped"].items()]),
    ]
    if summary["merged"]:
        merged = model["merged"]
        parts += [
            ("h", 2, f"Against the merge `{summary['merged']}`"),
            ("p", f"‖δ‖ = {_f(merged['norm'])}; share of ‖δ‖² outside the span of the task "
                  f"vectors: {_f(merged['residual'])}."),
            ("table", ["model", "cos(δ, τi)", "coefficient ci", "share of ‖δ‖²",
                       "τi entries δ goes against"],
             [[names[i], _f(merged["cosine"][i]), _f(merged["coefficients"][i]),
               _f(merged["share"][i]), _f(merged["against"][i])] for i in range(n)]),
        ]
    keys, layers = _layers(summary)
    mean = lambda m: sum(m[i][j] or 0 for i, j in _pairs(n)) / max(1, len(_pairs(n)))  # noqa: E731
    parts += [
        ("h", 2, "Per layer"),
        ("table", ["layer", *[f"‖τ‖ {x}" for x in names], "mean cosine", "sign conflicts",
                   "mean Jaccard"],
         [[k, *[_f(v) for v in f["norms"]], _f(mean(f["cosine"])),
           f"{f['sign_conflict_rate']:.2%}", _f(mean(f["jaccard"]))]
          for k, f in zip(keys, layers)]),
        ("h", 2, "Plots"),
        *[("img", p) for p in plots],
    ]
    if summary["warnings"]:
        parts += [("h", 2, "Warnings"), ("ul", summary["warnings"])]
    return parts


def markdown(content: list[tuple]) -> str:
    """`blocks` as a Markdown page (GitHub's tables)."""
    out = []
    for kind, *rest in content:
        if kind == "h":
            out.append("#" * rest[0] + " " + rest[1])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "table":
            header, rows = rest
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out.append("\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |"
                                           for row in rows]))
        elif kind == "img":
            out.append(f"![{rest[0]}]({rest[0]})")
        else:
            out.append("\n".join(f"- {item}" for item in rest[0]))
    return "\n\n".join(out) + "\n"


HTML_STYLE = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
              "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
              "padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"
              "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}")


def html(content: list[tuple], images: Path | None = None) -> str:
    """`blocks` as one HTML page; with `images` (their folder) the plots are embedded as data
    URIs, so the page can be sent on its own."""
    out = []
    for kind, *rest in content:
        if kind == "h":
            out.append(f"<h{rest[0]}>{_inline(rest[1])}</h{rest[0]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(rest[0])}</p>")
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{_inline(str(c))}</th>" for c in header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>"
                           for row in rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            source = rest[0]
            if images is not None:
                data = base64.b64encode((images / source).read_bytes()).decode("ascii")
                source = f"data:image/png;base64,{data}"
            out.append(f'<p><img src="{source}" alt="{html_lib.escape(rest[0])}"></p>')
        else:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in rest[0]) + "</ul>")
    title = next((text for kind, *rest in content if kind == "h" for text in rest[1:2]), "")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>"
            f"{html_lib.escape(title)}</title><style>{HTML_STYLE}</style></head><body>\n"
            + "\n".join(out) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """Escaped text with **bold** and `code` as HTML."""
    text = html_lib.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)
