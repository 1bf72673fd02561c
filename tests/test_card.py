"""Model cards: one builder (huggingface_hub's ModelCardData / EvalResult) for exported cards and for
model-index updates, each benchmark filed under one dataset id with one rounding."""

import json
import math
import os
import re

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load

from nearid import card
from nearid.card import benchmark_results, readme_section, update_model_card, write_model_card
from tests.helpers import EVAL_RESULTS, REPO_ID, REPO_ROOT, TRAINING_ARGS, card_kwargs, export_with_card, snapshot


def test_card_front_matter_has_the_hub_metadata_and_results(repo):
    metadata = metadata_load(repo / "README.md")
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-feature-extraction"
    assert metadata["license"] == "apache-2.0"
    assert metadata["base_model"] == "google/siglip2-so400m-patch14-384"
    assert metadata["datasets"] == ["Aleksandar/NearID", "Aleksandar/NearID-Flux"]
    assert "custom_code" in metadata["tags"]
    assert [entry["name"] for entry in metadata["model-index"]] == [REPO_ID]

    card = ModelCard.load(repo / "README.md")
    found = [{k: getattr(r, k) for k in EVAL_RESULTS[0]} for r in card.data.eval_results]
    assert found == EVAL_RESULTS
    assert "arXiv:2604.01973" in card.text and "trust_remote_code=True" in card.text


def test_card_lists_every_training_argument(repo):
    text = (repo / "README.md").read_text()
    table = text.split("Training arguments:")[1].split("\n## ")[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `(.*)` \|$", table, flags=re.MULTILINE))
    assert list(rows) == list(TRAINING_ARGS)
    assert float(rows["learning_rate"]) == TRAINING_ARGS["learning_rate"]
    assert json.loads(rows["train_sources"]) == TRAINING_ARGS["train_sources"]
    assert rows["mixed_precision"] == "fp16" and rows["resume_from"] == "None"


def test_card_model_details_come_from_the_exported_config(repo):
    config = json.loads((repo / "config.json").read_text())
    size = json.loads((repo / "preprocessor_config.json").read_text())["size"]
    text = (repo / "README.md").read_text()
    assert f"| embedding | {config['embed_dim']}-d" in text
    assert f"resized to {size['height']}x{size['width']}" in text


def test_card_without_evaluation_has_no_model_index(tmp_path):
    folder = export_with_card(tmp_path / "repo", results=None)
    assert "model-index" not in metadata_load(folder / "README.md")
    assert "No evaluation was run" in (folder / "README.md").read_text()


def test_card_shows_the_summary_table_verbatim(tmp_path):
    table = "| scorer | NearID SSR |\n|---|---|\n| NearID | 97.25 |\n"
    folder = tmp_path / "repo"
    folder.mkdir()
    write_model_card(folder, **card_kwargs(summary_table=table))
    evaluation = (folder / "README.md").read_text().split("## Evaluation\n\n")[1]
    assert evaluation.startswith(table)


def test_refused_results_leave_the_readme_as_it_was(repo):
    before = snapshot(repo)
    bad = [{**EVAL_RESULTS[0], "metric_value": math.nan}]
    with pytest.raises(ValueError, match="finite"):
        write_model_card(repo, **card_kwargs(results=bad))
    assert snapshot(repo) == before  # README unchanged, no draft left behind


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


def _hub(dataset_id, commit="a" * 40):
    """The provenance nearid.data.readers.open_dataset records for a Hub dataset read at `commit`."""
    return {"kind": "hub", "source": dataset_id, "format": "hub", "split": "train", "revision": None,
            "commit": commit, "fingerprint": "f", "num_rows": 10}


def _local(path):
    return {"kind": "local", "source": str(path), "format": "save_to_disk", "split": None, "revision": None,
            "fingerprint": "f", "num_rows": 10}


def test_benchmark_results_file_each_benchmark_once_with_one_rounding():
    values = {"ssr": 97.123456, "pa": float("nan"), "mo": 0.123456}
    nearid = benchmark_results("nearid", values, "test", _hub("Aleksandar/NearID"))
    assert [(r.dataset_type, r.dataset_split, r.metric_type, r.metric_value) for r in nearid] == [
        ("Aleksandar/NearID", "test", "ssr", 97.1235)]  # a non-finite metric is left out
    mtg = benchmark_results("mtg", {"mo": 0.123456, "mo_pair": 0.5, "ssr": 35.0, "pa": 46.5}, "test",
                            _hub("abdo-eldesokey/mtg-dataset"))
    assert {r.dataset_type for r in mtg} == {"abdo-eldesokey/mtg-dataset"} and mtg[0].metric_value == 0.1235
    assert all(r.task_type == card.TASK for r in nearid + mtg)


def test_the_fixed_prose_is_copied_from_the_readme(repo):
    text = (repo / "README.md").read_text()
    for title in ("Limitations", "Citation"):
        section = readme_section(title)
        assert section and f"## {title}\n\n{section}" in text
    with pytest.raises(ValueError, match="no section '## Nope'"):
        readme_section("Nope")


# --------------------------------------------------------------------------------------------------
# The repository's own card: the paper's Table 1 row in its model-index


def test_readme_model_index_is_the_papers_table1_row_and_parses_back():
    results = ModelCard.load(REPO_ROOT / "README.md").data.eval_results
    found = {(r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in results}
    assert found == {
        ("Aleksandar/NearID", "test", "ssr"): 99.17, ("Aleksandar/NearID", "test", "pa"): 99.71,
        ("abdo-eldesokey/mtg-dataset", "test", "mo"): 0.465, ("abdo-eldesokey/mtg-dataset", "test", "mo_pair"): 0.486,
        ("abdo-eldesokey/mtg-dataset", "test", "ssr"): 35.0, ("abdo-eldesokey/mtg-dataset", "test", "pa"): 46.5,
        ("yuangpeng/dreambench_plus", None, "mh_object"): 0.545,
    }
    assert all(r.source_name and "2604.01973" in r.source_name and r.source_url == card.PAPER_URL for r in results)
    assert ModelCard.load(REPO_ROOT / "README.md").data.model_name == card.PAPER_MODEL_NAME
    # Generated by the card builder from the one table of the paper's numbers: the README cannot drift.
    assert [r.__dict__ for r in results] == [r.__dict__ for r in card.paper_results()]
    card.check_card_metadata(REPO_ROOT / "README.md")


def test_write_paper_results_touches_only_the_model_index(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("---\nlicense: apache-2.0\ntags:\n  - identity\n---\n\n# Body\n\nkept as is\n")
    card.write_paper_results(readme)
    text = readme.read_text()
    assert text.startswith("---\nlicense: apache-2.0\ntags:\n  - identity\nmodel-index:\n")
    assert text.endswith("---\n\n# Body\n\nkept as is\n")
    assert [r.__dict__ for r in ModelCard.load(readme).data.eval_results] == \
        [r.__dict__ for r in card.paper_results()]


# --------------------------------------------------------------------------------------------------
# What a card may claim: Hub ids only for data read from the Hub at a recorded revision


def test_results_are_filed_under_a_hub_dataset_only_when_all_their_data_came_from_it_at_a_revision(tmp_path):
    values = {"ssr": 50.0, "pa": 60.0}
    pinned = benchmark_results("nearid", values, "test", [_hub("Aleksandar/NearID"), _hub("Aleksandar/NearID-Flux")])
    assert {(r.dataset_type, r.dataset_revision, r.dataset_name) for r in pinned} == {
        ("Aleksandar/NearID", "a" * 40, "NearID benchmark")}
    by_branch = benchmark_results("nearid", values, "test", {**_hub("Aleksandar/NearID", None), "revision": "v1.0"})
    assert {r.dataset_revision for r in by_branch} == {"v1.0"}
    for data in (None, _local(tmp_path / "positives"), [_hub("Aleksandar/NearID"), _local(tmp_path / "flux")],
                 _hub("Aleksandar/NearID", commit=None)):  # the last: read from the Hub, revision unknown
        results = benchmark_results("nearid", values, "test", data)
        assert {(r.dataset_type, r.dataset_revision, r.dataset_name) for r in results} == {
            (None, None, "NearID benchmark (local data)")}


def test_card_lists_hub_datasets_in_the_metadata_and_local_data_in_the_text(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    hub, unpinned, local = _hub("Aleksandar/NearID"), _hub("Aleksandar/NearID-Flux", None), _local(tmp_path / "sdxl")
    results = benchmark_results("nearid", {"ssr": 50.0, "pa": 60.0}, "test", [hub, local])
    with pytest.warns(UserWarning) as caught:
        write_model_card(folder, **card_kwargs(datasets=[hub, unpinned, local], results=results,
                                               base_model="google/siglip2-so400m-patch14-384"))
    said = [str(w.message) for w in caught]  # datasets left out, results kept out of the model-index
    assert len(said) == 2 and "2 training dataset(s)" in said[0] and "2 result(s) were measured on local" in said[1]
    text = (folder / "README.md").read_text()
    meta = metadata_load(folder / "README.md")
    assert meta["datasets"] == ["Aleksandar/NearID"] and "model-index" not in meta
    assert meta["base_model"] == "google/siglip2-so400m-patch14-384"
    assert f"[Aleksandar/NearID](https://huggingface.co/datasets/Aleksandar/NearID) at revision `{'a' * 40}`" in text
    assert "`Aleksandar/NearID-Flux` read from the Hub without a recorded revision" in text
    assert "local data `sdxl` (save_to_disk, 10 rows)" in text and str(tmp_path) not in text
    assert "| NearID benchmark (local data) | test | NearID SSR | 50.0 |" in text
    card.check_card_metadata(folder / "README.md")


def test_update_model_card_refuses_results_on_local_data(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("---\nlicense: mit\n---\n# body\n")
    local = benchmark_results("mtg", {"mo": 0.5}, "test", _local(tmp_path / "mtg"))
    with pytest.raises(ValueError, match="MTG MO have no Hub dataset.*local data"):
        update_model_card(readme, "NearID", local)
    assert readme.read_text() == "---\nlicense: mit\n---\n# body\n"
