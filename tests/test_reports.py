"""Reports: provenance, results layout, markdown tables, CSV, PNG plots, model card."""

import hashlib
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from nearid.metrics import NEARID_TABLE1_SOURCES, nearid_pooled_scores, nearid_scores
from nearid.reports import (
    TABLE1_COLUMNS,
    per_source_markdown,
    plot_margin_histograms,
    plot_ssr_pa,
    provenance,
    results_document,
    table1_markdown,
    table1_row,
    update_model_card,
)

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
    assert set(prov["versions"]) == {"python", "torch", "transformers", "datasets", "huggingface_hub",
                                     "numpy", "PIL"}
    assert prov["versions"]["numpy"] == np.__version__
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
                     dreambench={"mh_object": 0.5, "mh_all": 0.4})
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
    path = plot_margin_histograms(tmp_path / "plots" / "margins.png", margins)
    width, height = _png_size(path)
    assert width > height > 200  # 2 rows of 4 panels
    single = plot_margin_histograms(tmp_path / "one.png", {"flux": rng.normal(size=10), "empty": []})
    _png_size(single)
    assert sorted(os.listdir(tmp_path)) == ["one.png", "plots"]
    with pytest.raises(ValueError, match="at least one source"):
        plot_margin_histograms(tmp_path / "none.png", {})


def test_plot_ssr_pa_png(tmp_path):
    per_source = {s: {"ssr": 10.0 * i, "pa": 12.5 * i} for i, s in enumerate(NEARID_TABLE1_SOURCES)}
    path = plot_ssr_pa(tmp_path / "ssr_pa.png", per_source)
    width, height = _png_size(path)
    assert width > 400 and height > 300
    assert os.listdir(tmp_path) == ["ssr_pa.png"]


# --------------------------------------------------------------------------------------------------
# Model card


def _split(text):
    m = re.match(r"---\n(.*?\n)---\n", text, re.S)
    assert m, "no front matter"
    return m.group(1), text[m.end():]


def _result(metric, value, name=None, dataset="Aleksandar/NearID", split="test"):
    return dict(task_type="image-feature-extraction", dataset_name=dataset.split("/")[-1],
                dataset_type=dataset, dataset_split=split, metric_type=metric,
                metric_name=name or metric, metric_value=value)


def _metrics(text):
    """(front matter dict, {(dataset type, split, metric type): value}); fails on duplicates."""
    meta = yaml.safe_load(_split(text)[0])
    out = {}
    for entry in meta.get("model-index", []):
        for r in entry["results"]:
            for m in r["metrics"]:
                key = (r["dataset"]["type"], r["dataset"].get("split"), m["type"])
                assert key not in out, f"duplicate result {key}"
                out[key] = m["value"]
    return meta, out


def _without_model_index(front_matter):
    """The front-matter lines outside the top-level `model-index:` entry, verbatim."""
    kept, inside = [], False
    for line in front_matter.splitlines(keepends=True):
        inside = line.startswith("model-index:") or (inside and line[:1] in (" ", "-"))
        if not inside:
            kept.append(line)
    return "".join(kept)


def test_update_model_card_on_real_readme(tmp_path):
    original = (REPO_ROOT / "README.md").read_text()
    ofm, obody = _split(original)
    ometa, existing = _metrics(original)  # the README may already carry results: they must survive
    others = {k: v for k, v in ometa.items() if k != "model-index"}
    readme = tmp_path / "README.md"
    readme.write_text(original)
    nearid, mtg = ("Aleksandar/NearID", "test"), ("abdo-eldesokey/mtg-dataset", "test")

    update_model_card(readme, "NearID", [_result("ssr", 12.5, "NearID SSR"),
                                         _result("mo", np.float64(0.25), dataset=mtg[0])])
    fm, body = _split(readme.read_text())
    assert body == obody
    assert _without_model_index(fm) == _without_model_index(ofm)  # other lines byte-identical
    meta, values = _metrics(readme.read_text())
    assert {k: v for k, v in meta.items() if k != "model-index"} == others
    assert values == {**existing, (*nearid, "ssr"): 12.5, (*mtg, "mo"): 0.25}
    assert [e["name"] for e in meta["model-index"]] == ["NearID"]

    update_model_card(readme, "NearID", [_result("ssr", 99.5, "NearID SSR"),
                                         _result("pa", 99.71, "NearID PA")])
    fm2, body2 = _split(readme.read_text())
    assert body2 == obody and _without_model_index(fm2) == _without_model_index(ofm)
    meta2, values2 = _metrics(readme.read_text())
    assert values2 == {**existing, (*nearid, "ssr"): 99.5, (*mtg, "mo"): 0.25, (*nearid, "pa"): 99.71}
    assert {k: v for k, v in meta2.items() if k != "model-index"} == others

    from huggingface_hub import ModelCard  # the Hub's own parser reads it back
    card = ModelCard.load(readme)
    assert card.data.model_name == "NearID" and len(card.data.eval_results) == len(values2)
    assert card.text == obody


def test_update_model_card_replaces_model_index_in_the_middle(tmp_path):
    readme = tmp_path / "README.md"
    head = "---\nlicense: apache-2.0\nmodel-index:\n- name: old\n  results: []\n"
    tail = "# a comment that stays\ntags:\n  - identity\n---\n\n# Title\n\nBody with --- and ``` inside.\n"
    readme.write_text(head + tail)
    update_model_card(readme, "NearID", [_result("ssr", 50.0)])
    text = readme.read_text()
    assert text.startswith("---\nlicense: apache-2.0\nmodel-index:\n- name: NearID\n")
    assert text.endswith(tail)
    meta = yaml.safe_load(_split(text)[0])
    assert meta["tags"] == ["identity"] and meta["license"] == "apache-2.0"
    assert meta["model-index"][0]["results"][0]["metrics"] == [{"type": "ssr", "value": 50.0, "name": "ssr"}]


def test_update_model_card_errors_leave_file_unchanged(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Just markdown\n\nNo metadata here.\n")
    with pytest.raises(ValueError, match="no YAML front matter.*found '# Just markdown"):
        update_model_card(readme, "NearID", [_result("ssr", 1.0)])
    assert readme.read_text() == "# Just markdown\n\nNo metadata here.\n"

    readme.write_text("---\nlicense: [apache\n---\n# body\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        update_model_card(readme, "NearID", [_result("ssr", 1.0)])
    assert readme.read_text() == "---\nlicense: [apache\n---\n# body\n"

    readme.write_text("---\nlicense: mit\n---\n# body\n")
    with pytest.raises(ValueError, match="finite"):
        update_model_card(readme, "NearID", [_result("ssr", math.nan)])
    with pytest.raises(ValueError, match="bad model-card result"):
        update_model_card(readme, "NearID", [{"metric_type": "ssr", "metric_value": 1.0}])
    assert readme.read_text() == "---\nlicense: mit\n---\n# body\n"
    assert os.listdir(tmp_path) == ["README.md"]
