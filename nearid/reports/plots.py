"""PNG plots of NearID evaluations and training runs, and contact sheets of images.

matplotlib is imported when a figure is drawn (never pyplot: no global backend switch), so importing
this module is cheap. Contact sheets are composed in pixels with PIL, in matplotlib's font. Each plot is
written atomically through `nearid.io`.
"""

import functools
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nearid.io import atomic_path
from nearid.reports.tables import RETRIEVAL_COLUMNS, format_value


DPI = 110
# zlib's fastest level, not its default 6: in benchmarks/bench_plots.py a contact sheet's encoding (half or more
# of its time) takes 17-51% less CPU for files 9-23% larger; levels 2-3 differ from 1 by a few percent either
# way, and from 4 on zlib switches to its slower lazy matching for a few percent more compression.
PNG_COMPRESS_LEVEL = 1
CAPTION_POINTS, TITLE_POINTS = 7, 10
SHORT_NAME = 12  # characters of a source name that fixed margins make room for (Table 1's have at most 10)
SHEET_GAP = 8  # pixels around and between the cells of a contact sheet
UNREADABLE_GREY = 220


def _new_figure(width: float, height: float, margins: tuple | None = None):
    """A matplotlib Figure drawn by the Agg canvas: no pyplot, no global backend switch.

    margins: (left, right, bottom, top) inches around the axes, for a figure whose labels have a known size;
    None lays it out with matplotlib's constrained layout, which measures every label first: a second pass
    over the figure, a third or more of its drawing time.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained" if margins is None else None)
    FigureCanvasAgg(fig)
    if margins is not None:
        left, right, bottom, top = margins
        fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)
    return fig


def _subplots(fig, nrows: int = 1, ncols: int = 1, gaps: tuple = (0.0, 0.0), **kwargs):
    """`fig.subplots` with `gaps` (inches between columns, between rows) in a figure of fixed margins."""
    params, (width, height) = fig.subplotpars, fig.get_size_inches()
    grid_width, grid_height = (params.right - params.left) * width, (params.top - params.bottom) * height
    axes_width = (grid_width - gaps[0] * (ncols - 1)) / ncols
    axes_height = (grid_height - gaps[1] * (nrows - 1)) / nrows
    return fig.subplots(nrows, ncols, gridspec_kw={"wspace": gaps[0] / axes_width, "hspace": gaps[1] / axes_height},
                        **kwargs)


def _save_png(fig, path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return Path(path)


def _save_image(image, path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return Path(path)


def plot_margin_histograms(path, margins_by_source: Mapping[str, np.ndarray], model: str, bins: int = 40) -> Path:
    """Histogram of NearID margins per source, one panel each, on a shared x range.

    margins_by_source: source -> margins (any shape; NaN, i.e. absent terms, are dropped). A term
    wins when its margin is > 0 (right of the dashed line); each title gives the winning share.
    model: the scorer, named in the figure's title.
    """
    data = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in margins_by_source.items()}
    data = {k: v[np.isfinite(v)] for k, v in data.items()}
    if not data:
        raise ValueError("plot_margin_histograms needs at least one source")
    finite = np.concatenate(list(data.values()))
    lo, hi = (min(finite.min(), 0.0), max(finite.max(), 0.0)) if finite.size else (-1.0, 1.0)
    step = (hi - lo or 1.0) / bins
    edges = step * np.arange(math.floor(lo / step) - 1, math.ceil(hi / step) + 2)  # 0 is an edge
    ncols = min(4, len(data))
    nrows = math.ceil(len(data) / ncols)
    # The legend has a row of its own under the panels, where it meets neither the title nor the data.
    fig = _new_figure(3.6 * ncols, 2.9 * nrows + 0.35, margins=(0.6, 0.15, 0.8, 0.95))
    axes = _subplots(fig, nrows, ncols, gaps=(0.6, 0.85), squeeze=False, sharex=True)
    for ax, (name, m) in zip(axes.flat, data.items()):
        summary = f"{100 * (m > 0).mean():.1f}% of {m.size} terms win" if m.size else "no terms"
        # One filled outline per histogram, not a bar per bin: the same picture, a fraction of the artists to draw.
        ax.stairs(np.histogram(m[m > 0], edges)[0], edges, fill=True, color="tab:green", label="win (> 0)")
        ax.stairs(np.histogram(m[m <= 0], edges)[0], edges, fill=True, color="tab:red", label="loss (\u2264 0)")
        ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{name}\n{summary}", fontsize=10)
        ax.set_xlabel("margin = sim(views) \u2212 sim(view, distractor)", fontsize=8)
        ax.set_ylabel("terms", fontsize=9)
        ax.tick_params(labelsize=8, labelbottom=True)
    for ax in list(axes.flat)[len(data):]:
        ax.set_visible(False)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle(f"NearID margins per distractor source\n{model}", fontsize=12)
    return _save_png(fig, path)


def plot_ssr_pa(path, per_source: Mapping[str, Mapping], model: str) -> Path:
    """Grouped bars of SSR and PA (%) per source, each bar labelled with its value.

    per_source: source -> dict with "ssr" and "pa" (e.g. `nearid_scores`); order is kept.
    """
    if not per_source:
        raise ValueError("plot_ssr_pa needs at least one source")
    names = list(per_source)
    x = np.arange(len(names))
    width = 0.38
    rotated, longest = len(names) > 4, max(len(n) for n in names)
    # Margins for names as long as Table 1's; longer ones are laid out by matplotlib, which measures them.
    margins = (0.65, 0.85, 0.4 + (0.04 * longest if rotated else 0.0), 0.5) if longest <= SHORT_NAME else None
    fig = _new_figure(max(5.0, 1.1 * len(names) + 1.5), 4.2, margins=margins)
    ax = fig.subplots()
    for offset, key, label, color in ((-width / 2, "ssr", "SSR", "tab:blue"),
                                      (width / 2, "pa", "PA", "tab:orange")):
        values = [float(per_source[n][key]) for n in names]
        bars = ax.bar(x + offset, values, width, label=label, color=color)
        ax.bar_label(bars, labels=[format_value(v, 1) for v in values], fontsize=7, padding=2)
    ax.set_xticks(x, names, rotation=30 if rotated else 0, ha="right" if rotated else "center")
    ax.set_ylim(0, 112)
    ax.set_ylabel("%")
    ax.set_title(f"NearID SSR and PA per distractor source\n{model}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save_png(fig, path)


def plot_retrieval(path, scores: Mapping, model: str) -> Path:
    """Bars of the near-identity retrieval metrics (%): recall@k, mAP, and the distractor-first rate."""
    names = [(h, k) for h, k, _ in RETRIEVAL_COLUMNS if not k.startswith("cluster_")]
    values = [float(scores[k]) for _, k in names]
    fig = _new_figure(6.5, 4.2, margins=(0.65, 0.15, 0.35, 0.6))
    ax = fig.subplots()
    colors = ["tab:red" if k == "distractor_first_rate" else "tab:blue" for _, k in names]
    bars = ax.bar(range(len(names)), values, color=colors)
    ax.bar_label(bars, labels=[format_value(v, 1) for v in values], fontsize=8, padding=2)
    ax.set_xticks(range(len(names)), [h for h, _ in names], fontsize=8)
    ax.set_ylim(0, 112)
    ax.set_ylabel("%")
    ax.set_title(f"Near-identity retrieval, {scores['n_queries']} queries, {scores['n_gallery']} gallery images\n"
                 f"clustering at {scores['cluster_threshold']:.3f}: ARI {scores['cluster_ari']:.3f}, NMI "
                 f"{scores['cluster_nmi']:.3f}\n{model}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save_png(fig, path)


def plot_score_distributions(path, records: Sequence[Mapping], model: str) -> Path:
    """Per method, the distribution of generated images' `score_mean` (violin, median bar) with each subject's
    mean as a labelled dot: how methods compare, and how much subjects differ within a method."""
    return _save_png(score_distribution_figure(records, model), path)


def score_distribution_figure(records: Sequence[Mapping], model: str, labelled_subjects: int = 8):
    """The figure of `plot_score_distributions`. Each violin is drawn whole (the y-axis spans every violin,
    and a method with fewer than 2 distinct scores gets dots only); subject dots are named when a method has
    at most `labelled_subjects` subjects; the legend sits below the axes, never over the data."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    if not methods:
        raise ValueError("plot_score_distributions needs at least one scored image")
    fig = _new_figure(max(5.5, 1.6 * len(methods) + 2), 5.0)
    ax = fig.subplots()
    values = [np.array([r["score_mean"] for r in records if r["method"] == m], dtype=float) for m in methods]
    spread = [x for x, v in enumerate(values) if len(np.unique(v)) > 1]  # a KDE needs 2 distinct values
    bodies = []
    if spread:
        bodies = ax.violinplot([values[x] for x in spread], positions=spread, showmedians=True,
                               showextrema=False)["bodies"]
        bodies[0].set_label("distribution of the images' scores (bar: median)")
    for x, method in enumerate(methods):
        subjects = sorted({r["subject"] for r in records if r["method"] == method})
        means = [np.mean([r["score_mean"] for r in records if r["method"] == method and r["subject"] == s])
                 for s in subjects]
        xs = np.full(len(means), x) + (np.linspace(-0.12, 0.12, len(means)) if len(means) > 1 else 0.0)
        ax.scatter(xs, means, s=16, color="black", zorder=3, label="mean of one subject's images" if x == 0 else None)
        if len(subjects) <= labelled_subjects:
            for dot_x, mean, subject in zip(xs, means, subjects):
                ax.annotate(subject, (dot_x, mean), xytext=(4, 0), textcoords="offset points", fontsize=6,
                            va="center", zorder=4)
    ax.set_ylim(_score_limits(bodies, min(v.min() for v in values), max(v.max() for v in values)))
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_xticks(range(len(methods)), [f"{m}\n({len(v)} image{'s' if len(v) != 1 else ''})"
                                        for m, v in zip(methods, values)],
                  rotation=30 if len(methods) > 3 else 0, ha="right" if len(methods) > 3 else "center")
    ax.set_ylabel("identity score (cosine, mean over references)")
    ax.set_title(f"Score distribution per method\n{model}", fontsize=10)
    fig.legend(loc="outside lower center", fontsize=8, ncols=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _score_limits(bodies, low: float, high: float) -> tuple:
    """y-limits that hold every violin body (in data coordinates) and every score from `low` to `high`."""
    for body in bodies:
        for path in body.get_paths():
            if len(path.vertices):
                low, high = min(low, path.vertices[:, 1].min()), max(high, path.vertices[:, 1].max())
    pad = max(0.05 * (high - low), 0.02)
    return low - pad, high + pad


def plot_training_loss(path, history: Mapping, model: str) -> Path:
    """The logged training loss by step, and the validation SSR/PA on a second axis when there are any."""
    losses = history.get("loss", [])
    if not losses:
        raise ValueError("no training loss was logged")
    # A validation of FluxC sources alone has no pooled score (FluxC enters no pool).
    validation = [v for v in history.get("validation", []) if v.get("split") == "val" and v.get("pooled")]
    fig = _new_figure(7, 4, margins=(1.0, 0.65 if validation else 0.15, 0.5, 0.45))
    ax = fig.subplots()
    steps, values = zip(*losses)
    ax.plot(steps, values, color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (Tier 1 + alpha Tier 2)")
    ax.grid(alpha=0.3)
    if validation:
        right = ax.twinx()
        right.plot([v["step"] for v in validation], [v["pooled"]["ssr"] for v in validation], "o-",
                   color="tab:green", label="val SSR")
        right.plot([v["step"] for v in validation], [v["pooled"]["pa"] for v in validation], "s-",
                   color="tab:orange", label="val PA")
        right.set_ylabel("%")
        right.legend(loc="center right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"Training the NearID head\nbase model {model}", fontsize=10)
    return _save_png(fig, path)


def plot_image_grid(path, rows: Sequence[Sequence[tuple]], title: str, cell_inches: float = 1.5) -> Path:
    """A contact sheet: rows of cells `(image, caption)`, an image an [H, W, 3] uint8 array, or None for
    one that could not be read (drawn as an empty grey cell). `title` says what is shown and the model."""
    return _save_image(contact_sheet(rows, title, cell_inches), path)


def contact_sheet(rows: Sequence[Sequence[tuple]], title: str, cell_inches: float = 1.5):
    """The PIL image of `plot_image_grid`. Each image is fitted into a `cell_inches` square (at the plots' dpi)
    keeping its aspect ratio, under its caption; a column is wider when a caption line is. Composed in pixels,
    not as matplotlib Axes: a sheet has no axes to show, and laying out an Axes per cell costs several times
    more (benchmarks/bench_plots.py)."""
    from PIL import Image, ImageDraw

    if not rows or not any(rows):
        raise ValueError("plot_image_grid needs at least one image")
    rows = [[(image, caption if image is not None else f"{caption}\n(unreadable)") for image, caption in cells]
            for cells in rows]
    caption_font, title_font = _font(CAPTION_POINTS), _font(TITLE_POINTS)
    side = round(cell_inches * DPI)
    column = max(side, max(_text_width(caption, caption_font) for cells in rows for _, caption in cells) + SHEET_GAP)
    grid_width = max(len(cells) for cells in rows) * (column + SHEET_GAP) + SHEET_GAP
    width = max(grid_width, _text_width(title, title_font) + 2 * SHEET_GAP)
    caption_lines = [max((caption.count("\n") + 1 for _, caption in cells), default=0) for cells in rows]
    title_height = _line_height(title_font) * (title.count("\n") + 1) + SHEET_GAP
    row_heights = [lines * _line_height(caption_font) + side + 2 * SHEET_GAP for lines in caption_lines]
    sheet = Image.new("RGB", (width, SHEET_GAP + title_height + sum(row_heights)), "white")
    draw = ImageDraw.Draw(sheet)
    _draw_lines(draw, title, width / 2, SHEET_GAP, title_font)
    top, left = SHEET_GAP + title_height, (width - grid_width) // 2 + SHEET_GAP
    for cells, lines, height in zip(rows, caption_lines, row_heights):
        box_top = top + lines * _line_height(caption_font) + SHEET_GAP // 2
        for number, (image, caption) in enumerate(cells):
            x = left + number * (column + SHEET_GAP)
            # Captions end just above their image, whatever their number of lines.
            _draw_lines(draw, caption, x + column / 2, box_top - SHEET_GAP // 2 - _line_height(caption_font)
                        * (caption.count("\n") + 1), caption_font)
            box = (x + (column - side) // 2, box_top)
            if image is None:
                draw.rectangle((*box, box[0] + side - 1, box[1] + side - 1), fill=(UNREADABLE_GREY,) * 3)
            else:
                picture = _fit(Image.fromarray(np.asarray(image)).convert("RGB"), side)
                sheet.paste(picture, (box[0] + (side - picture.width) // 2, box[1]))
        top += height
    return sheet


def _fit(picture, side: int):
    """`picture` scaled to fit a `side` square, aspect kept. An enlargement of 3 times or more keeps the pixels
    square (nearest), as matplotlib shows small images, so a tiny thumbnail is not smoothed into a blur."""
    from PIL import Image

    scale = side / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, Image.NEAREST if scale >= 3 else Image.LANCZOS)


def _font(points: float):
    """DejaVu Sans, the font of the other plots (it ships with matplotlib), at `points` at the plots' dpi."""
    return _truetype(round(points * DPI / 72))


@functools.lru_cache(maxsize=None)
def _truetype(pixels: int):
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), pixels)


def _line_height(font) -> int:
    return round(1.2 * font.size)


def _text_width(text: str, font) -> int:
    return max(math.ceil(font.getlength(line)) for line in text.split("\n"))


def _draw_lines(draw, text: str, centre: float, top: float, font) -> None:
    """Each line of `text` centred on `centre`, the first line's top at `top`."""
    for number, line in enumerate(text.split("\n")):
        draw.text((centre, top + number * _line_height(font)), line, fill="black", font=font, anchor="ma")


def plot_mtg_similarity_vs_oracle(path, sims: Mapping, oracles: np.ndarray, scores: Mapping, model: str,
                                  similarities: Sequence, correlations: Sequence) -> Path:
    """2x2 scatter of each similarity behind MO against its oracle (scored rows), r in the titles."""
    fig = _new_figure(8, 7, margins=(0.75, 0.15, 0.45, 0.8))
    images = {name: (a, b) for name, a, b in similarities}
    for ax, (name, view) in zip(_subplots(fig, 2, 2, gaps=(0.9, 0.75)).flat, correlations):
        ax.scatter(oracles[:, view - 1], sims[name], s=14, alpha=0.7)
        ax.set_title(f"{name} vs oracle{view}: r = {scores[f'r_{name}_oracle{view}']:.3f}", fontsize=10)
        ax.set_xlabel(f"oracle{view}: share of object {view} left unchanged", fontsize=8)
        ax.set_ylabel(f"{name} = cos({images[name][0]}, {images[name][1]})", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"MTG: similarity vs oracle, {scores['n_rows']} rows "
                 f"(MO {scores['mo']:.3f}, MOpair {scores['mo_pair']:.3f})\n{model}", fontsize=11)
    return _save_png(fig, path)
