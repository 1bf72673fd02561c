"""Reports: provenance, results layout, markdown tables, CSV, PNG plots, model card."""

import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nearid
from nearid.metrics import NEARID_TABLE1_SOURCES, nearid_pooled_scores, nearid_scores
from nearid.reports import plots, run_outputs
from nearid.reports.plots import plot_margin_histograms, plot_ssr_pa
from nearid.reports.results_file import provenance, results_document
from nearid.reports.tables import TABLE1_COLUMNS, per_source_markdown, table1_markdown, table1_row

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Provenance and the results document


def test_provenance_keys_versions_and_git_commit(tmp_path):
    split = tmp_path / "split.json"
    split.write_text('{"test": [1, 2]}')
    prov = provenance({"name_or_path": "Aleksandar/nearid-siglip2", "revision": "abc"},
                      [{"repo_id": "Aleksandar/NearID", "split": "test"}], str(split), {"device": "cpu"})
    assert list(prov) == ["model", "datasets", "split_file", "split_file_sha256", "versions", "git",
                          "date_utc", "command", "platform", "extra"]
    assert prov["model"]["revision"] == "abc" and prov["datasets"][0]["repo_id"] == "Aleksandar/NearID"
    assert prov["split_file_sha256"] == hashlib.sha256(split.read_bytes()).hexdigest()
    assert set(prov["versions"]) == {"python", "nearid", "torch", "transformers", "datasets", "huggingface_hub",
                                     "numpy", "PIL"}
    assert prov["versions"]["numpy"] == np.__version__
    assert prov["versions"]["nearid"] == nearid.__version__
    assert prov["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert prov["command"] == sys.argv and prov["extra"] == {"device": "cpu"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", prov["date_utc"])
    if (REPO_ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{40}", prov["git"]["commit"])
        assert prov["git"]["commit"] == head
        assert isinstance(prov["git"]["dirty"], bool)
    else:
        assert prov["git"] == {"commit": None, "dirty": None}
    host = socket.gethostname()
    text = json.dumps(prov)
    assert "hostname" not in text and (len(host) < 4 or host not in text)
    assert provenance({}, [], None)["split_file_sha256"] is None


def test_results_document_layout_and_counts():
    metrics = {"ssr": 50.0, "pa": 75.0, "n_samples": 4, "n_terms": 20, "per_source": {"flux": {"n_terms": 6}}}
    skipped = [{"sample": 3, "reason": "missing image"}, {"sample": 5, "reason": "missing image"},
               {"sample": 9, "reason": "no distractor"}]
    doc = results_document("nearid", {"name": "nearid"}, metrics, {"git": {}}, skipped)
    assert list(doc) == ["benchmark", "scorer", "metrics", "skipped", "counts", "provenance"]
    assert doc["metrics"] == metrics and doc["skipped"] == skipped
    assert doc["counts"] == {"n_skipped": 3, "skipped_by_reason": {"missing image": 2, "no distractor": 1},
                             "n_samples": 4, "n_terms": 20, "per_source/flux/n_terms": 6}
    with pytest.raises(ValueError, match="reason"):
        results_document("nearid", {}, metrics, {}, [{"sample": 1}])


# --------------------------------------------------------------------------------------------------
# Markdown


def test_table1_markdown_exact():
    rows = {
        "NearID": {"nearid_ssr": 99.1666, "nearid_pa": 99.714, "mtg_mo": 0.46549, "mtg_mo_pair": 0.486,
                   "mtg_ssr": 35.0, "mtg_pa": 46.25, "dreambench_mh": 0.5449},
        "CLIP": {"nearid_ssr": 10.3051, "mtg_mo": float("nan"), "mtg_pa": None, "dreambench_mh": -0.0123},
    }
    assert table1_markdown(rows) == (
        "| scorer | NearID SSR | NearID PA | MTG MO | MTG MOpair | MTG SSR | MTG PA | DB++ MH |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| NearID | 99.17 | 99.71 | 0.465 | 0.486 | 35.00 | 46.25 | 0.545 |\n"
        "| CLIP | 10.31 | \u2013 | \u2013 | \u2013 | \u2013 | \u2013 | -0.012 |\n")
    assert [k for _, k, _ in TABLE1_COLUMNS] == ["nearid_ssr", "nearid_pa", "mtg_mo", "mtg_mo_pair",
                                                 "mtg_ssr", "mtg_pa", "dreambench_mh"]


def test_table1_row_from_metric_dicts():
    row = table1_row(nearid={"ssr": 1.0, "pa": 2.0, "n_terms": 6},
                     mtg={"mo": 0.1, "mo_pair": 0.2, "ssr": 3.0, "pa": 4.0},
                     dreambench={"mh_object": 0.5, "mh_pooled_prompts": 0.4})
    assert row == {"nearid_ssr": 1.0, "nearid_pa": 2.0, "mtg_mo": 0.1, "mtg_mo_pair": 0.2,
                   "mtg_ssr": 3.0, "mtg_pa": 4.0, "dreambench_mh": 0.5}
    assert table1_row(mtg={"mo": 0.1, "mo_pair": 0.2, "ssr": 3.0, "pa": 4.0}).keys() == \
        {"mtg_mo", "mtg_mo_pair", "mtg_ssr", "mtg_pa"}


def _per_source(sources, seed=0):
    rng = np.random.default_rng(seed)
    raw, scores = {}, {}
    for i, s in enumerate(sources):
        margins = rng.normal(0.03 * i - 0.05, 0.1, (20 + 3 * i, 6))
        valid = np.ones_like(margins, bool)
        valid[: 2 + i, 2:] = False  # some 2-view samples
        raw[s], scores[s] = (margins, valid), nearid_scores(margins, valid)
    return raw, scores


def _cells(md, first_cell):
    line = next(l for l in md.splitlines() if l.startswith(f"| {first_cell}"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_per_source_markdown_pooled_row_matches_pooled_scores():
    raw, scores = _per_source(("fluxc",) + NEARID_TABLE1_SOURCES)
    md = per_source_markdown(scores)
    lines = md.splitlines()
    assert lines[0] == "| source | SSR | PA | samples | terms | mean margin |"
    firsts = [l.strip("|").split("|")[0].strip() for l in lines[2:]]
    assert firsts[:7] == list(NEARID_TABLE1_SOURCES)
    assert firsts[7].startswith("**Table-1 average**") and firsts[8].startswith("fluxc")
    pooled = nearid_pooled_scores(raw)
    avg = _cells(md, "**Table-1 average**")
    assert avg[1:] == [f"{pooled['ssr']:.2f}", f"{pooled['pa']:.2f}", str(pooled["n_samples"]),
                       str(pooled["n_terms"]), f"{pooled['margin_mean']:.4f}"]
    flux = _cells(md, "flux |")
    s = scores["flux"]
    assert flux == ["flux", f"{s['ssr']:.2f}", f"{s['pa']:.2f}", str(s["n_samples"]), str(s["n_terms"]),
                    f"{s['margin_mean']:.4f}"]


def test_per_source_markdown_without_all_table1_sources_has_no_average():
    _, scores = _per_source(("flux", "sdxl"))
    md = per_source_markdown(scores)
    assert "average" not in md and len(md.splitlines()) == 4


# --------------------------------------------------------------------------------------------------
# CSV


def _png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    assert len(data) > 5000  # drawn content, not an empty canvas
    return struct.unpack(">II", data[16:24])


def test_plot_margin_histograms_png(tmp_path):
    rng = np.random.default_rng(0)
    margins = {s: rng.normal(0.05, 0.1, (30, 6)) for s in NEARID_TABLE1_SOURCES}
    margins["flux"][0, 3:] = np.nan  # absent terms are dropped
    path = plot_margin_histograms(tmp_path / "plots" / "margins.png", margins, "tiny-model")
    width, height = _png_size(path)
    assert width > height > 200  # 2 rows of 4 panels
    single = plot_margin_histograms(tmp_path / "one.png", {"flux": rng.normal(size=10), "empty": []}, "m")
    _png_size(single)
    assert sorted(os.listdir(tmp_path)) == ["one.png", "plots"]
    with pytest.raises(ValueError, match="at least one source"):
        plot_margin_histograms(tmp_path / "none.png", {}, "m")


def test_plot_ssr_pa_png(tmp_path):
    per_source = {s: {"ssr": 10.0 * i, "pa": 12.5 * i} for i, s in enumerate(NEARID_TABLE1_SOURCES)}
    path = plot_ssr_pa(tmp_path / "ssr_pa.png", per_source, "tiny-model")
    width, height = _png_size(path)
    assert width > 400 and height > 300
    assert os.listdir(tmp_path) == ["ssr_pa.png"]


def _solid(colour, height=30, width=30):
    return np.full((height, width, 3), colour, np.uint8)


def _region(pixels, colour):
    """(top, left, bottom, right) of the pixels of exactly `colour`, asserting they fill that box: an image
    drawn whole, nothing drawn over it."""
    ys, xs = np.nonzero(np.all(pixels == colour, axis=-1))
    assert ys.size, f"no pixel of {colour} on the sheet"
    top, left, bottom, right = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
    assert ys.size == (bottom - top) * (right - left), f"{colour} is not one solid rectangle"
    return top, left, bottom, right


def test_image_grid_draws_each_image_whole_in_its_cell_row_by_row_under_its_caption(tmp_path):
    """Contact sheets (heatmaps, search results, clusters): each image lands whole, aspect kept, in its
    cell, rows top to bottom and cells left to right on a regular grid, with its caption's ink just above
    it and the title above all; an unreadable image is a grey cell; the sheet grows with rows and columns."""
    from PIL import Image

    red, green, blue, gold, violet = (255, 0, 0), (0, 160, 0), (0, 0, 255), (255, 200, 0), (200, 0, 200)
    rows = [[(_solid(red), "a.png\nscore 0.512"), (None, "b.png"), (_solid(green, 20, 40), "c")],
            [(_solid(blue), "d"), (_solid(gold, 40, 10), "e"), (_solid(violet), "f\nsecond line\nthird")]]
    path = plots.plot_image_grid(tmp_path / "sheet.png", rows, "Title line\nmodel")
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    boxes = {colour: _region(pixels, colour) for colour in (red, green, blue, gold, violet)}
    centre = {c: ((top + bottom) / 2, (left + right) / 2) for c, (top, left, bottom, right) in boxes.items()}
    size = {c: (bottom - top, right - left) for c, (top, left, bottom, right) in boxes.items()}
    assert size[red][0] == size[red][1] > 100 and size[blue] == size[violet] == size[red]  # one cell size
    assert size[green][1] == size[red][1] and size[green][1] == pytest.approx(2 * size[green][0], abs=2)
    assert size[gold][0] == size[red][0] and size[gold][0] == pytest.approx(4 * size[gold][1], abs=2)
    # Columns line up across rows, evenly spaced; the second row lies wholly below the first.
    assert centre[red][1] == centre[blue][1] and centre[green][1] == centre[violet][1]
    assert centre[gold][1] - centre[blue][1] == centre[violet][1] - centre[gold][1] > size[red][1]
    assert max(boxes[c][2] for c in (red, green)) < min(boxes[c][0] for c in (blue, gold, violet))
    # The unreadable image's cell (row 1, column 2) is grey around the centre of its cell.
    grey_y, grey_x = int(centre[red][0]), int(centre[gold][1])
    quarter = size[red][0] // 4
    assert (pixels[grey_y - quarter:grey_y + quarter, grey_x - quarter:grey_x + quarter] == 220).all()
    # Each caption's ink is just above its image, within its own lines (a one-line caption in a row of
    # three-line ones too), and the title's above the first row's captions.
    line, ink = 20, (pixels < 100).all(axis=-1)
    for top, left, _, right, lines in [(*boxes[red], 2), (boxes[red][0], grey_x - 10, 0, grey_x + 10, 2),
                                       (*boxes[blue], 1), (*boxes[gold], 1), (*boxes[violet], 3)]:
        assert ink[top - lines * line:top, left:right].any(), "no caption above an image"
    for top, left, _, right in (boxes[blue], boxes[gold]):
        assert not ink[top - 3 * line:top - line - 4, left:right].any(), "a one-line caption far from its image"
    assert ink[:min(boxes[c][0] for c in (red, green)) - 3 * line].any(), "no title"

    def sheet_size(sheet_rows):
        return Image.open(plots.plot_image_grid(tmp_path / "size.png", sheet_rows, "t")).size

    one = sheet_size([[(_solid(red), "a")]])
    wide, tall = sheet_size([[(_solid(red), "a")] * 3]), sheet_size([[(_solid(red), "a")]] * 2)
    assert wide[0] > 2.5 * one[0] and wide[1] == one[1] and tall[1] > 1.7 * one[1] and tall[0] == one[0]
    with pytest.raises(ValueError, match="at least one image"):
        plots.plot_image_grid(tmp_path / "none.png", [[]], "t")
    assert sorted(os.listdir(tmp_path)) == ["sheet.png", "size.png"]


# --------------------------------------------------------------------------------------------------
# The files of one run


def test_run_outputs_always_remove_a_stopped_runs_outputs_unless_they_are_continued(tmp_path):
    """A run stopped before its results file still leaves files and folders it always writes (a
    training run's checkpoints): a new run removes them, a resumed one keeps them."""
    (tmp_path / "checkpoints" / "step-1").mkdir(parents=True)
    (tmp_path / "logs.jsonl").write_text("{}\n")
    (tmp_path / "token_cache").mkdir()  # not a run output: kept
    run_outputs.RunOutputs(tmp_path, "x_results.json", always=("checkpoints", "logs.jsonl"), keep_previous=True)
    assert (tmp_path / "checkpoints" / "step-1").is_dir() and (tmp_path / "logs.jsonl").is_file()
    run_outputs.RunOutputs(tmp_path, "x_results.json", always=("checkpoints", "logs.jsonl", "release"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token_cache"]


def test_run_outputs_remove_the_previous_runs_files_and_list_their_own(tmp_path):
    first = run_outputs.RunOutputs(tmp_path, "x_results.json")
    for name in ("a.csv", "scores/old_method.json"):
        first.path(name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("first run")
    first.finish({"metrics": 1})
    (tmp_path / "mine.txt").write_text("not a run output")  # the user's file stays
    second = run_outputs.RunOutputs(tmp_path, "x_results.json")
    assert not (tmp_path / "x_results.json").exists()  # nothing vouches for a half-written run
    assert not (tmp_path / "scores" / "old_method.json").exists() and not (tmp_path / "a.csv").exists()
    second.path("a.csv").write_text("second run")
    document = json.loads(second.finish({"metrics": 2}).read_text())
    assert document["files"] == ["a.csv"] and document["warnings"] == []
    assert (tmp_path / "mine.txt").read_text() == "not a run output"


def test_a_failing_optional_step_is_a_warning_and_the_results_are_still_written(tmp_path, capsys):
    outputs = run_outputs.RunOutputs(tmp_path, "x_results.json")

    def broken_plot(path):
        raise ImportError("No module named 'matplotlib'")

    assert not outputs.optional("plotting x.png", broken_plot, outputs.path("x.png"))
    document = json.loads(outputs.finish({"metrics": {"ssr": 50.0}}).read_text())
    assert document["metrics"] == {"ssr": 50.0}
    assert document["warnings"] == ["plotting x.png failed (ImportError: No module named 'matplotlib'); the results "
                                    "are written without it"]
    assert "warning: plotting x.png failed" in capsys.readouterr().err


def test_training_loss_and_score_plots_name_the_model(tmp_path):
    history = {"loss": [[1, 3.0], [2, 2.5], [3, 2.0]],
               "validation": [{"step": 3, "split": "val", "pooled": {"ssr": 40.0, "pa": 60.0}}]}
    assert _png_size(plots.plot_training_loss(tmp_path / "loss.png", history, "tiny-model"))[0] > 300
    records = [{"method": m, "subject": s, "score_mean": v} for m, s, v in
               [("a", "cat", 0.5), ("a", "cat", 0.6), ("a", "dog", 0.2), ("b", "cat", 0.9), ("b", "dog", 0.8)]]
    assert _png_size(plots.plot_score_distributions(tmp_path / "scores.png", records, "tiny-model"))[0] > 300
    with pytest.raises(ValueError, match="no training loss"):
        plots.plot_training_loss(tmp_path / "none.png", {"loss": []}, "m")


def test_run_outputs_refuse_a_file_where_their_folder_should_be(tmp_path):
    (tmp_path / "nearid").write_text("kept")
    with pytest.raises(NotADirectoryError, match=r"expected a folder, but .*nearid is a file"):
        run_outputs.RunOutputs(tmp_path / "nearid" / "sub", "nearid_results.json")
    assert (tmp_path / "nearid").read_text() == "kept"


def test_skipped_by_reason_counts_short_reasons_of_the_decodes_own_messages(tmp_path):
    from PIL import Image

    from nearid.images import load_image
    from nearid.reports.results_file import skipped_by_reason

    Image.new("RGB", (20, 10)).save(tmp_path / "big.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    attempts = [lambda: load_image(tmp_path / "big.png", max_image_pixels=100),
                lambda: load_image(tmp_path / "broken.png"), lambda: load_image(tmp_path / "gone.png"),
                lambda: load_image({"bytes": None, "path": None}, name="positives row 3 column img2")]
    skipped = []
    for attempt in attempts:
        with pytest.raises((ValueError, OSError)) as error:
            attempt()
        skipped.append({"image": "x", "reason": str(error.value)})
    skipped += [{"image": "y", "reason": "missing image"},
                {"image": "z", "reason": f"{tmp_path}/a.png: the disk said '{'?' * 80}'"}]
    assert skipped_by_reason(skipped) == {"too large": 1, "unreadable": 1, "missing file": 1, "empty cell": 1,
                                          "missing image": 1, "other": 1}


def test_score_distributions_show_every_violin_whole_label_the_dots_and_keep_the_legend_off_the_data():
    rng = np.random.default_rng(0)
    records = [{"method": method, "subject": f"subject{i % 3}", "score_mean": float(np.clip(rng.normal(c, 0.2), -1, 1))}
               for method, c, n in (("near_one", 0.95, 40), ("low", 0.1, 40), ("two", 0.6, 2)) for i in range(n)]
    records.append({"method": "single", "subject": "subject0", "score_mean": 0.7})
    fig = plots.score_distribution_figure(records, "tiny-model")
    fig.canvas.draw()
    [ax] = fig.axes
    low, high = ax.get_ylim()
    bodies = [c for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
    assert len(bodies) == 3  # one per method with 2 or more distinct scores
    for body in bodies:
        y = np.concatenate([path.vertices[:, 1] for path in body.get_paths()])
        assert low <= y.min() and y.max() <= high
    legend_box, axes_box = fig.legends[0].get_window_extent(), ax.get_window_extent()
    assert legend_box.y1 <= axes_box.y0  # below the axes, never over the data
    labels = [text.get_text() for text in ax.texts]
    assert sorted(labels) == sorted([f"subject{i}" for i in range(3)] * 2 + ["subject0", "subject1", "subject0"])
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "single\n(1 image)"


def drawn_figure(monkeypatch, plot, *args):
    """The Figure `plot` saved, drawn, instead of its PNG."""
    saved = []
    monkeypatch.setattr(plots, "_save_png", lambda fig, path: saved.append(fig))
    plot("unused.png", *args)
    [fig] = saved
    fig.canvas.draw()
    return fig


def drawn_tick_labels(axis) -> list:
    """The labels of the ticks drawn: those inside the axis' view (matplotlib keeps labels for ticks beyond it)."""
    low, high = sorted(axis.get_view_interval())
    return [label for tick, label in zip(axis.get_ticklocs(), axis.get_ticklabels()) if low <= tick <= high]


FIXED_MARGIN_PLOTS = {
    "margins, one source": (plots.plot_margin_histograms, {"flux": np.linspace(-0.3, 0.4, 50)}, "demo_outputs/release"),
    "margins, Table 1's sources": (plots.plot_margin_histograms,
                                   {s: np.linspace(-0.3, 0.4, 50) for s in NEARID_TABLE1_SOURCES}, "tiny-model"),
    "training loss": (plots.plot_training_loss, {"loss": [[1, 3.0], [200, 2.0], [400, 1.0]],
                      "validation": [{"step": 200, "split": "val", "pooled": {"ssr": 40.0, "pa": 60.0}}]},
                      "demo_outputs/training/release"),
    "training loss, no validation": (plots.plot_training_loss, {"loss": [[1, 1234.5], [2, 0.001]]}, "tiny-model"),
    "training loss, small and negative": (plots.plot_training_loss, {"loss": [[1, -0.00021], [2, 0.00052], [3, 0.0003]]},
                                          "tiny-model"),
    "training loss, narrow range": (plots.plot_training_loss, {"loss": [[1, 0.123456], [2, 0.123457]]}, "tiny-model"),
    "SSR and PA, two sources": (plots.plot_ssr_pa, {"flux": {"ssr": 99.5, "pa": 100.0}, "sdxl": {"ssr": 0, "pa": 1}},
                                "tiny-model"),
    # Names longer than plots.SHORT_NAME: laid out by matplotlib's constrained layout instead.
    "SSR and PA, long names": (plots.plot_ssr_pa, {f"{name}_generations_inpainted_at_1024": {"ssr": 50.0, "pa": 60.0}
                                                    for name in ("a_thirty_character_source", "b", "c", "d", "e")},
                               "tiny-model"),
    "SSR and PA, Table 1's sources": (plots.plot_ssr_pa, {s: {"ssr": 50.0, "pa": 60.0} for s in NEARID_TABLE1_SOURCES},
                                      "tiny-model"),
    "retrieval": (plots.plot_retrieval, {"recall@1": 100.0, "recall@5": 100.0, "recall@10": 100.0, "map": 100.0,
                                         "distractor_first_rate": 0.0, "n_queries": 1000, "n_gallery": 10000,
                                         "cluster_threshold": 0.89, "cluster_ari": 1.0, "cluster_nmi": 1.0}, "tiny-model"),
    "MTG": (plots.plot_mtg_similarity_vs_oracle, {n: np.linspace(-1, 1, 5) for n in ("s_ab", "s_ac", "s_bc", "s_ad")},
            np.linspace(0, 1, 10).reshape(5, 2),
            {"r_s_ab_oracle1": 0.1, "r_s_ac_oracle2": -0.2, "r_s_bc_oracle1": 0.3, "r_s_ad_oracle2": 1.0, "n_rows": 5,
             "mo": 0.3, "mo_pair": 0.4}, "tiny-model",
            [("s_ab", "ref", "gen_a"), ("s_ac", "ref", "gen_b"), ("s_bc", "gen_a", "gen_b"), ("s_ad", "ref", "gen_c")],
            [("s_ab", 1), ("s_ac", 2), ("s_bc", 1), ("s_ad", 2)]),
}


@pytest.mark.parametrize("name", sorted(FIXED_MARGIN_PLOTS))
def test_a_plot_of_fixed_margins_keeps_every_label_inside_the_figure_and_off_the_axes(monkeypatch, name):
    # Laid out by hand (no constrained layout): every text must still fit, and no label may cover a data area.
    plot, *args = FIXED_MARGIN_PLOTS[name]
    fig = drawn_figure(monkeypatch, plot, *args)
    renderer = fig.canvas.get_renderer()
    texts = [*fig.texts, *[text for legend in fig.legends for text in legend.get_texts()]]
    for ax in fig.axes:
        texts += [*drawn_tick_labels(ax.xaxis), *drawn_tick_labels(ax.yaxis), ax.xaxis.label, ax.yaxis.label, ax.title,
                  ax.xaxis.get_offset_text(), ax.yaxis.get_offset_text(), *ax.texts]
        texts += ax.get_legend().get_texts() if ax.get_legend() else []
    texts = [text for text in texts if text.get_visible() and text.get_text().strip()]
    assert len(texts) > 10
    for text in texts:
        box = text.get_window_extent(renderer)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1, \
            (name, text.get_text(), box, fig.bbox)
    data_areas = [ax.get_window_extent(renderer).padded(-2) for ax in fig.axes if ax.get_visible()]
    for legend in fig.legends:  # a figure's legend meets neither its title nor a data area
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(other) for other in [*data_areas, *(t.get_window_extent(renderer) for t in fig.texts)])
    for ax in fig.axes:
        labels = [*drawn_tick_labels(ax.xaxis), *drawn_tick_labels(ax.yaxis), ax.xaxis.label, ax.yaxis.label, ax.title]
        for text in labels:
            if text.get_visible() and text.get_text().strip():
                box = text.get_window_extent(renderer)
                assert not any(box.overlaps(area) for area in data_areas), (name, text.get_text())
