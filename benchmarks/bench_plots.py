"""What drawing a contact sheet costs, and what each PNG compression level buys (`nearid.reports.plots`).

Contact sheets (`plot_image_grid`: the score heatmaps, a query's hits, each large cluster) are drawn
many times a run: `evaluate.py score --heatmaps` draws one per method and subject. This script draws
three typical sheets two ways on the same cells and prints the ratio:

- axes: matplotlib, one Axes per cell in a constrained-layout figure (how the sheets were drawn before);
- composed: `plot_image_grid`, the cells pasted into one image and the text drawn with PIL.

Then it encodes each sheet, and one matplotlib plot (the margin histograms), at every zlib level and
prints the encode time and file size: the reason for `plots.PNG_COMPRESS_LEVEL`.

Last, the plots of fixed layout (margin histograms, training loss, SSR/PA, retrieval, MTG) are drawn as they
are, with margins set by hand, and with matplotlib's constrained layout instead, which measures every label
before drawing.

The cells are synthetic scenes (`nearid.synthetic.drawing`); "textured" ones carry noise of a photo's
grain, as real generations and galleries do, which PNG compresses less well than flat colours.

Usage: python benchmarks/bench_plots.py [--repeats 5] [--smoke]
"""

import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import (  # noqa: E402
    benchmark_parser,
    environment_lines,
    parse_benchmark_args,
    write_results,
)

from nearid.reports import plots  # noqa: E402
from nearid.synthetic.drawing import SUPERSAMPLE, draw_scene, random_pose, random_spec, render_view  # noqa: E402

# name: (rows, cells per row, image side in pixels, caption lines, cell inches), as the commands draw them
SHEETS = {"heatmaps": (3, 6, 192, 2, 2.0), "query": (1, 11, 128, 4, 1.5), "cluster": (5, 8, 128, 4, 1.5)}
LEVELS = range(1, 10)


def parse_args(argv=None):
    parser = benchmark_parser(__doc__, "plots.txt", "one sheet of two small images, one repeat, nothing recorded")
    parser.add_argument("--repeats", type=int, default=5, help="timed drawings of each sheet (the best counts)")
    return parse_benchmark_args(parser, argv, {"repeats": 1})


def cells(rows: int, columns: int, side: int, lines: int, textured: bool) -> list:
    """Rows of (image, caption) cells of synthetic scenes, one caption line longer than the rest."""
    rng = np.random.default_rng(0)
    sheet = []
    for row in range(rows):
        cells_of_row = []
        for column in range(columns):
            scene = draw_scene(rng, side * SUPERSAMPLE)
            image = np.asarray(render_view(random_spec(rng), random_pose(rng), scene)[0].convert("RGB"))
            if textured:
                image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
            caption = "\n".join([f"#{column + 1} {rng.uniform():.3f}"] + [f"folder_{row}/sub_{column}/"] * (lines - 2)
                                + [f"image_{row}_{column}.png"])
            cells_of_row.append((image, caption))
        sheet.append(cells_of_row)
    return sheet


def axes_sheet(path, rows, title, cell_inches):
    """The reference: one matplotlib Axes per cell, a title over each, in a constrained layout."""
    fig = plots._new_figure(cell_inches * max(map(len, rows)), (cell_inches + 0.13 * 5 + 0.1) * len(rows) + 0.6)
    axes = fig.subplots(len(rows), max(map(len, rows)), squeeze=False)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
        ax.set_axis_off()
    for ax_row, row in zip(axes, rows):
        for ax, (image, caption) in zip(ax_row, row):
            ax.imshow(image)
            ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return plots._save_png(fig, path)


def cpu_best(fn, repeats: int, warm_up: bool = True) -> float:
    """CPU seconds of the fastest of `repeats` calls of `fn`, after one untimed call (first-call imports, the
    font) unless `warm_up` is False. Drawing and encoding run on one thread, and CPU time is less disturbed
    than wall time by other work on a shared machine."""
    if warm_up:
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def encode_costs(image, repeats: int) -> dict:
    """{level: (milliseconds, kilobytes)} of encoding `image` (PIL) as PNG at each zlib level."""
    costs = {}
    for level in LEVELS:
        buffer = io.BytesIO()
        seconds = cpu_best(lambda: image.save(buffer, format="PNG", compress_level=level), repeats, warm_up=False)
        buffer.seek(0), buffer.truncate()
        image.save(buffer, format="PNG", compress_level=level)
        costs[level] = (1000 * seconds, buffer.tell() / 1024)
    return costs


def margins_plot(folder, sources: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    margins = {f"source{i}": rng.normal(0.05, 0.2, (120, 6)) for i in range(sources)}
    return Image.open(plots.plot_margin_histograms(folder / "margins.png", margins, "a model")).copy()


def layout_plots(folder, sources: int) -> dict:
    """{name: the call drawing it} of the plots laid out with fixed margins, on inputs of a typical run with
    `sources` distractor sources."""
    rng = np.random.default_rng(0)
    history = {"loss": [[step, float(2 - step / 300 + 0.2 * rng.random())] for step in range(1, 600, 5)],
               "validation": [{"step": step, "split": "val", "pooled": {"ssr": 20.0, "pa": 40.0}}
                              for step in range(100, 600, 100)]}
    per_source = {f"source{i}": {"ssr": 20.0 + i, "pa": 40.0 + i} for i in range(sources)}
    retrieval = {"recall@1": 17.7, "recall@5": 55.7, "recall@10": 75.9, "map": 28.2, "distractor_first_rate": 46.8,
                 "n_queries": 79, "n_gallery": 237, "cluster_threshold": 0.89, "cluster_ari": 0.055, "cluster_nmi": 0.888}
    names = ("s_ab", "s_ac", "s_bc", "s_ad")
    mtg = ({name: rng.uniform(-1, 1, 40) for name in names}, rng.random((40, 2)),
           {"r_s_ab_oracle1": 0.1, "r_s_ac_oracle2": 0.2, "r_s_bc_oracle1": 0.3, "r_s_ad_oracle2": 0.4, "n_rows": 40,
            "mo": 0.3, "mo_pair": 0.4}, "a model", [(name, "a", "b") for name in names], list(zip(names, (1, 2, 1, 2))))
    margins = {f"source{i}": rng.normal(0.05, 0.2, (120, 6)) for i in range(sources)}
    return {"margins": lambda: plots.plot_margin_histograms(folder / "margins.png", margins, "a model"),
            "training loss": lambda: plots.plot_training_loss(folder / "loss.png", history, "a model"),
            "SSR and PA": lambda: plots.plot_ssr_pa(folder / "ssr_pa.png", per_source, "a model"),
            "retrieval": lambda: plots.plot_retrieval(folder / "retrieval.png", retrieval, "a model"),
            "MTG": lambda: plots.plot_mtg_similarity_vs_oracle(folder / "mtg.png", *mtg)}


def layout_lines(folder, repeats: int, smoke: bool) -> list:
    """Each plot of fixed margins drawn as it is and with constrained layout instead (CPU seconds, best of
    `repeats`); a smoke run draws each once, with one source."""
    by_hand = plots._new_figure
    lines = [f"plots of fixed layout, best of {repeats} (CPU seconds): constrained layout vs margins set by hand",
             "", f"{'plot':<16}{'constrained (s)':>17}{'fixed (s)':>11}{'ratio':>8}"]
    for name, draw in layout_plots(folder, 1 if smoke else 5).items():
        fixed = cpu_best(draw, repeats, warm_up=not smoke)
        plots._new_figure = lambda width, height, margins=None: by_hand(width, height)
        try:
            constrained = cpu_best(draw, repeats, warm_up=not smoke)
        finally:
            plots._new_figure = by_hand
        lines.append(f"{name:<16}{constrained:>17.3f}{fixed:>11.3f}{constrained / fixed:>7.1f}x")
    return lines


def main(argv=None):
    from PIL import Image

    args = parse_args(argv)
    sheets = {"heatmaps": (1, 2, 64, 2, 2.0)} if args.smoke else SHEETS
    lines = [f"contact sheets, best of {args.repeats} (CPU seconds): matplotlib with one Axes per cell vs composed "
             "in pixels by plot_image_grid", "",
             f"{'sheet':<10}{'images':>8}{'cells':>7}{'axes (s)':>10}{'composed (s)':>14}{'ratio':>8}"]
    encoded = {}
    with tempfile.TemporaryDirectory(prefix="bench-plots-") as folder:
        folder = Path(folder)
        for name, (rows, columns, side, caption_lines, inches) in sheets.items():
            for textured in (False, True):
                kind = "textured" if textured else "drawn"
                grid = cells(rows, columns, side, caption_lines, textured)
                title = f"{name} sheet of {kind} images\na model"
                axes = cpu_best(lambda: axes_sheet(folder / "axes.png", grid, title, inches), args.repeats)
                composed = cpu_best(lambda: plots.plot_image_grid(folder / "sheet.png", grid, title, inches),
                                     args.repeats)
                lines.append(f"{name:<10}{kind:>8}{sum(map(len, grid)):>7}{axes:>10.3f}{composed:>14.3f}"
                             f"{axes / composed:>7.1f}x")
                encoded[f"{name} sheet, {kind}"] = Image.open(folder / "sheet.png").copy()
        encoded["margin histograms (matplotlib)"] = margins_plot(folder, 1 if args.smoke else 5)
        layout = layout_lines(folder, args.repeats, args.smoke)
    lines += ["", f"PNG encoding, best of {args.repeats}: CPU milliseconds / kilobytes at each zlib compress level "
              f"(plots use {plots.PNG_COMPRESS_LEVEL})", "",
              f"{'image':<34}{'pixels':>12}" + "".join(f"{level:>13}" for level in LEVELS)]
    for name, image in encoded.items():
        costs = encode_costs(image, args.repeats)
        lines.append(f"{name:<34}{f'{image.width}x{image.height}':>12}"
                     + "".join(f"{f'{ms:.1f}/{kb:.0f}':>13}" for ms, kb in costs.values()))
    write_results(args.output, environment_lines() + [""] + lines + [""] + layout)


if __name__ == "__main__":
    main()
