"""Model cards of NearID: one builder for an exported repo's README.md and for `--model-index` updates.

Both paths go through `huggingface_hub.ModelCardData` / `EvalResult`:

- `benchmark_results(benchmark, values, split, data)`: the `EvalResult`s of a benchmark's headline
  metrics, filed under the Hub dataset the data was read from, with one rounding, whether the
  numbers come from training's final evaluation or from `evaluate.py --model-index`. So evaluating
  a trained release on the same data replaces the release's own entries instead of adding a
  second set.
- `write_model_card(folder, ...)`: the card of an exported repo (front matter with `model-index`,
  quick start, model details, training arguments, evaluation, limitations, citation).
- `update_model_card(readme, name, results)`: results into an existing card's `model-index`; a
  result with the same task, dataset, config, split and metric replaces the old one, and every
  other byte of the card is kept.
- `paper_results()` / `write_paper_results(readme)`: NearID's row of the paper's Table 1 as
  `model-index` results with the paper as their source (the repository's own README.md carries
  them; a test keeps the two equal).
- `check_card_metadata(readme)`: the Hub's metadata rules that can be checked offline, run before
  every upload.

A card names a dataset by its Hub id only when the data was read from that id at a recorded
revision (`hub_dataset_id`); results on local data stay out of `model-index` (the Hub would show
them as results on the benchmark) and are listed in the card's text as local data. Local paths never
go into `datasets` or `base_model`; `card_warnings` says what a card then lacks.

The card's fixed prose (limitations, citation) is written once, in the repository's README.md,
and copied from there (`readme_section`).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nearid import hub_ids
from nearid.io import atomic_write_bytes, atomic_write_text
from nearid.resources import readme_text

LICENSE = "apache-2.0"
CARD_TAGS = ("identity", "image-similarity", "personalization", "siglip2", "custom_code")
PAPER_URL = "https://arxiv.org/abs/2604.01973"
TASK = "image-feature-extraction"
DECIMALS = 4
# Each benchmark's published Hub dataset (the paper's numbers are filed under it) and its display name.
BENCHMARK_DATASETS = {
    "nearid": ("Aleksandar/NearID", "NearID benchmark"),
    "retrieval": ("Aleksandar/NearID", "NearID near-identity retrieval"),
    "mtg": ("abdo-eldesokey/mtg-dataset", "MTG"),
    "dreambench": ("yuangpeng/dreambench_plus", "DreamBench++"),
}
# The headline metrics of each benchmark: (key in the metrics dict, display name).
BENCHMARK_METRICS = {
    "nearid": (("ssr", "NearID SSR"), ("pa", "NearID PA")),
    "retrieval": (("recall@1", "Retrieval R@1"), ("map", "Retrieval mAP"),
                  ("distractor_first_rate", "Distractor-first rate")),
    "mtg": (("mo", "MTG MO"), ("mo_pair", "MTG MOpair"), ("ssr", "MTG SSR"), ("pa", "MTG PA")),
    "dreambench": (("mh_object", "DB++ MH (object)"), ("mh_all_categories", "DB++ MH (all categories)")),
}


LOCAL_DATA = "local data"
# The paper's results are filed under this model name and cite the paper.
PAPER_MODEL_NAME = "NearID"
PAPER_SOURCE = {"source_name": "NearID paper, Table 1 (arXiv 2604.01973)", "source_url": PAPER_URL}


class CardWarning(UserWarning):
    """Something a model card leaves out because it could not be claimed truthfully (`card_warnings`)."""


def benchmark_results(benchmark: str, values: Mapping, split: str | None, data=None, *,
                      source: Mapping | None = None) -> list:
    """`EvalResult`s of the finite headline metrics of `benchmark` ("nearid", "mtg", ...), 4 decimals.

    data: the provenance of the data the metrics were measured on (a `nearid.data.readers.open_dataset`
        provenance dict, or a list of them, e.g. the positives and every distractor source). The
        results are filed under its Hub id, at its revision, only when all of it was read from the
        Hub at a recorded revision (`hub_dataset_id`); otherwise they carry no dataset type and
        are named as local data: `write_model_card` lists them in the card's text, not in
        `model-index`.
    source: {"source_name", "source_url"} of numbers taken from a publication (`PAPER_SOURCE`);
        they are filed under the benchmark's published dataset.
    """
    from huggingface_hub import EvalResult

    published, dataset_name = BENCHMARK_DATASETS[benchmark]
    dataset_type, revision = (published, None) if source else (hub_dataset_id(data), _hub_revision(data))
    if dataset_type is None:
        dataset_name, revision = f"{dataset_name} ({LOCAL_DATA})", None
    results = []
    for key, name in BENCHMARK_METRICS[benchmark]:
        value = values.get(key)
        if value is None or not math.isfinite(float(value)):
            continue
        results.append(EvalResult(task_type=TASK, dataset_type=dataset_type, dataset_name=dataset_name,
                                  dataset_split=split, dataset_revision=revision, metric_type=key,
                                  metric_name=name, metric_value=round(float(value), DECIMALS),
                                  **dict(source or {})))
    return results


def paper_results() -> list:
    """NearID's row of the paper's Table 1 (`tables.PAPER_TABLE1`, the one copy of the paper's
    numbers) as `EvalResult`s, each with the paper as its source."""
    from nearid.reports import tables

    row = dict(zip((key for _, key, _ in tables.TABLE1_COLUMNS), tables.PAPER_TABLE1["NearID (paper)"]))
    by_benchmark = {  # benchmark: (split the paper measured on, headline metrics)
        "nearid": ("test", {"ssr": row[tables.NEARID_SSR], "pa": row[tables.NEARID_PA]}),
        "mtg": ("test", {"mo": row[tables.MTG_MO], "mo_pair": row[tables.MTG_MO_PAIR],
                         "ssr": row[tables.MTG_SSR], "pa": row[tables.MTG_PA]}),
        "dreambench": (None, {"mh_object": row[tables.DREAMBENCH_MH]}),
    }
    return [r for benchmark, (split, values) in by_benchmark.items()
            for r in benchmark_results(benchmark, values, split, source=PAPER_SOURCE)]


def write_paper_results(readme) -> Path:
    """Write `paper_results()` into the model-index of `readme` (this repository's README.md, in a clone)."""
    return update_model_card(readme, PAPER_MODEL_NAME, paper_results())


# --------------------------------------------------------------------------------------------------
# What a card may name: Hub ids the data and the base model really came from


def _parts(data) -> list:
    return [] if data is None else [data] if isinstance(data, Mapping) else list(data)


def _hub_revision(data) -> str | None:
    """The commit (else the requested revision) of the first part of `data`, if it came from the Hub."""
    parts = _parts(data)
    if not parts or not isinstance(parts[0], Mapping) or parts[0].get("kind") != "hub":
        return None
    return parts[0].get("commit") or parts[0].get("revision")


def hub_dataset_id(data) -> str | None:
    """The Hub dataset id `data` came from, or None.

    `data` is a dataset provenance dict (`nearid.data.readers.open_dataset`), a list of them (all must
    qualify; the first names the dataset), or a string. A provenance qualifies when it was read
    from the Hub (kind "hub") at a recorded revision (a resolved commit or a requested revision).
    A string is the caller's word that it is a Hub id; it qualifies when it looks like one and is
    not a local path.
    """
    parts = _parts(data) if not isinstance(data, (str, Path)) else [str(data)]
    if not parts:
        return None
    for part in parts:
        if isinstance(part, str):
            if not is_hub_id(part):
                return None
        elif part.get("kind") != "hub" or not (part.get("commit") or part.get("revision")):
            return None
    first = parts[0]
    return first if isinstance(first, str) else first["source"]


def is_hub_id(name) -> bool:
    """`name` is a valid Hub repo id of the form namespace/name (`nearid.hub_ids`, and as huggingface_hub
    validates one) and not an existing local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return False
    return hub_ids.is_hub_id(str(name))


def check_card_metadata(readme) -> None:
    """Check a model card's front matter against the Hub's metadata rules that hold offline.

    The metadata must parse as a model card (huggingface_hub's own parser, `model-index`
    included); `base_model` and `datasets` must be Hub ids, not local paths; every `model-index`
    result must name its dataset by Hub id and have a numeric value. Raises ValueError naming
    every problem, so an upload can stop before anything is sent.
    """
    import yaml
    from huggingface_hub import ModelCard

    readme = Path(readme)
    try:
        data = ModelCard.load(readme).data
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{readme}: the model card's metadata cannot be read ({e}). Fix its YAML front "
                         "matter, then upload again.") from None
    problems = [f"{key} {value!r} is not a Hub id (namespace/name)" + (" but a local path" if Path(value).exists()
                                                                       else "")
                for key in ("base_model", "datasets") for value in _as_list(data.to_dict().get(key))
                if not is_hub_id(value)]
    for r in data.eval_results or []:
        if not (isinstance(r.dataset_type, str) and hub_ids.looks_like_hub_id(r.dataset_type)):
            problems.append(f"model-index result {r.metric_type!r} names its dataset {r.dataset_type!r}, not a "
                            "Hub dataset id")
        if isinstance(r.metric_value, bool) or not isinstance(r.metric_value, (int, float)):
            problems.append(f"model-index result {r.metric_type!r} has the value {r.metric_value!r}, not a number")
    if problems:
        raise ValueError(f"{readme}: the model card's metadata breaks the Hub's rules: {'; '.join(problems)}. "
                         "Nothing was uploaded. Remove or correct these entries in the front matter (local data "
                         "and local base models belong in the card's text), then upload again.")


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _local_description(part) -> str:
    """A local dataset for the card's text: its folder or file name and what was read, never its path."""
    if isinstance(part, Mapping):
        facts = [f for f in (part.get("format"), f"{part['num_rows']} rows" if part.get("num_rows") else None,
                             f"split {part['split']}" if part.get("split") else None) if f]
        if part.get("kind") == "hub":
            return f"`{part['source']}` read from the Hub without a recorded revision ({', '.join(facts)})"
        return f"{LOCAL_DATA} `{Path(str(part['source'])).name}` ({', '.join(facts)})"
    return f"{LOCAL_DATA} `{Path(str(part)).name}`"


def card_warnings(base_model, datasets, results) -> list:
    """What a card built from these arguments lacks, one sentence each (empty when nothing)."""
    lacks = []
    if base_model is not None and not is_hub_id(base_model):
        lacks.append(f"the base model {base_model} is a local folder, not a Hub id: the card has no base_model, so "
                     "the Hub will not link this model to its base model. Train from a Hub id (--base-model "
                     "owner/name) to record it.")
    local = [_local_description(d) for d in _parts(datasets) if hub_dataset_id(d) is None]
    if local:
        lacks.append(f"{len(local)} training dataset(s) did not come from the Hub at a recorded revision "
                     f"({'; '.join(local)}): the card's datasets list leaves them out and its text names them as "
                     "local data.")
    unfiled = [r for r in results or [] if _eval_result(r).dataset_type is None]
    if unfiled:
        names = sorted({_eval_result(r).dataset_name for r in unfiled})
        lacks.append(f"{len(unfiled)} result(s) were measured on local data ({', '.join(names)}): they are listed "
                     "in the card's text but not in its model-index, so the Hub's evaluation widget does not show "
                     "them. Evaluate on the Hub datasets (e.g. Aleksandar/NearID at a pinned revision) to file "
                     "results there.")
    return lacks


def readme_section(title: str) -> str:
    """The text of the section `## {title}` of the repository's README.md (the fixed prose of every card)."""
    text = readme_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    if match is None:
        raise ValueError(f"README.md has no section '## {title}', which every model card copies")
    return match.group(1).strip()


# --------------------------------------------------------------------------------------------------
# A new card for an exported repo


def write_model_card(folder, *, base_model: str, datasets: Sequence[str], training_args: Mapping,
                     results: Sequence | None = None, repo_id: str | None = None,
                     summary_table: str | None = None, model_name: str | None = None,
                     base_model_commit: str | None = None) -> Path:
    """Write `folder/README.md`, the model card of an exported NearID repo, in one step.

    Args:
        folder: the repo folder; its config.json and preprocessor_config.json give the embedding
            size and input resolution shown in the card.
        base_model: the SigLIP checkpoint the backbone and the initial head come from; in the
            front matter only when it is a Hub id.
        datasets: the training datasets: provenance dicts (`nearid.data.readers.open_dataset`) or strings
            (Hub ids or paths). Only those from the Hub at a recorded revision (`hub_dataset_id`)
            are listed in the front matter; the text names the others as local data.
        training_args: argument name -> value, shown as a table in this order.
        results: `EvalResult`s (e.g. from `benchmark_results`), or dicts of their fields; those
            with a dataset type become the front matter's `model-index`, all are listed in the
            text. None or empty: no evaluation.
        repo_id: the Hub id the folder is published as, used in the quick start.
        summary_table: markdown shown under "Evaluation"; without it the results are listed there.
        model_name: the card's title and `model-index` name; default `repo_id`, else the folder's name.
        base_model_commit: the Hub commit the base model was read at (`nearid.loading.ResolvedModel`);
            named beside it when given.

    Each thing the card lacks for it (`card_warnings`) is a `CardWarning` (a `UserWarning`).
    """
    from huggingface_hub import ModelCardData

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder. write_model_card writes README.md into an exported "
                                "repo folder: export one first with export_hub_folder(model, processor, folder).")
    if not isinstance(training_args, Mapping):
        raise TypeError(f"training_args must be a dict of argument name -> value, got a "
                        f"{type(training_args).__name__}; for a dataclass pass dataclasses.asdict(args).")
    datasets = [str(datasets)] if isinstance(datasets, (str, Path)) else \
        [d if isinstance(d, Mapping) else str(d) for d in datasets]
    name = model_name or repo_id or folder.name
    results = [_eval_result(r) for r in results or []]
    for lack in card_warnings(base_model, datasets, results):
        warnings.warn(f"model card of {name}: {lack}", CardWarning, stacklevel=2)
    hub_datasets = [hub_dataset_id(d) for d in datasets if hub_dataset_id(d)]
    filed = [r for r in results if r.dataset_type]
    data = ModelCardData(library_name="transformers", pipeline_tag=TASK, license=LICENSE,
                         base_model=str(base_model) if is_hub_id(base_model) else None,
                         datasets=list(dict.fromkeys(hub_datasets)) or None, tags=list(CARD_TAGS),
                         model_name=name, eval_results=filed or None)
    sections = [
        f"---\n{data.to_yaml()}\n---",
        f"# {name}\n\n"
        "NearID scores whether two images show the **same object instance**, not just a similar scene: a "
        "frozen SigLIP2 vision encoder with a trained attention-pooling head, learned with near-identity "
        "distractors (a similar but different object inpainted into exactly the same background; "
        f"[arXiv 2604.01973]({PAPER_URL})). Use it to score identity preservation of personalized "
        "generation, or to retrieve and cluster images by identity.",
        _quick_start(repo_id),
        "## Model details\n\n" + _markdown_table(["", ""], _model_facts(folder, base_model, base_model_commit)),
        "## Training\n\nDatasets:\n\n" + "".join(f"- {_dataset_line(d)}\n" for d in datasets)
        + "\nTraining arguments:\n\n"
        + _markdown_table(["argument", "value"], [(f"`{k}`", _code(v)) for k, v in training_args.items()]),
        "## Evaluation\n\n" + _evaluation_text(results, summary_table),
        "## Limitations\n\n" + readme_section("Limitations"),
        "## Citation\n\n" + readme_section("Citation"),
    ]
    return atomic_write_text(folder / "README.md", "\n\n".join(sections) + "\n")


def _quick_start(repo_id) -> str:
    repo = json.dumps(repo_id or "path/to/this/folder")
    return f"""## Quick start

Use transformers 5.18 or later (`pip install "transformers>=5.18,<6"`): releases 5.4 to 5.17 refuse
`AutoImageProcessor` unless torchvision is installed.

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

REPO = {repo}  # a Hub id or a local folder with these files
REVISION = "main"  # pin a commit hash for reproducible scores

model = AutoModel.from_pretrained(REPO, revision=REVISION, trust_remote_code=True, dtype=torch.float32).eval()
processor = AutoImageProcessor.from_pretrained(REPO, revision=REVISION, trust_remote_code=True)

images = [Image.open("reference.jpg"), Image.open("generated.png")]
with torch.no_grad():
    embeds = model.get_image_features(**processor(images, return_tensors="pt"))  # L2-normalised
score = (embeds[0] @ embeds[1]).item()  # cosine similarity: higher means the same object instance
print(f"identity score: {{score:.4f}}")
```"""


def _dataset_line(dataset) -> str:
    hub_id = hub_dataset_id(dataset)
    if hub_id is None:
        return _local_description(dataset)
    revision = _hub_revision(dataset)
    return _hub_link(hub_id, "datasets/") + (f" at revision `{revision}`" if revision else "")


def _model_facts(folder, base_model, commit=None) -> list:
    base = _hub_link(base_model) if is_hub_id(base_model) else \
        f"a local SigLIP checkpoint `{Path(str(base_model)).name}`"
    base += f" at commit `{commit}`" if commit else ""
    rows = [("base model", f"{base}: the frozen vision encoder; the trained head starts "
                           "as a copy of its attention-pooling head"),
            ("architecture", "SigLIP vision transformer (frozen) + multi-head attention-pooling (MAP) head "
                             "(trained)")]
    config = _read_json(folder / "config.json")
    if "embed_dim" in config:
        rows.append(("embedding", f"{config['embed_dim']}-d, L2-normalised; similarity is the dot product"))
    size = _read_json(folder / "preprocessor_config.json").get("size", {})
    if "height" in size and "width" in size:
        rows.append(("input", f"RGB resized to {size['height']}x{size['width']}, scaled to [-1, 1]"))
    return rows


def _evaluation_text(results, summary_table) -> str:
    if summary_table:
        return summary_table.strip()
    if not results:
        return "No evaluation was run for this export."
    rows = [(r.dataset_name, r.dataset_split or "", r.metric_name or r.metric_type, str(r.metric_value))
            for r in results]
    return _markdown_table(["dataset", "split", "metric", "value"], rows)


def _read_json(path) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def _hub_link(repo_id: str, prefix: str = "") -> str:
    """A link to the Hub page of `repo_id` (prefix "datasets/" for a dataset); a local path stays plain code."""
    if hub_ids.is_hub_id(repo_id):
        return f"[{repo_id}](https://huggingface.co/{prefix}{repo_id})"
    return _code(repo_id)


def _code(value) -> str:
    """`value` as inline code that is safe inside a markdown table cell."""
    text = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Results into an existing card


def _front_matter(text: str, readme_path) -> tuple:
    """(match of huggingface_hub's front matter regex, parsed dict); clear errors otherwise."""
    import yaml
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    match = REGEX_YAML_BLOCK.search(text)
    if match is None:
        raise ValueError(f"{readme_path} has no YAML front matter: expected the file to start with a "
                         f"'---' line, metadata, and a closing '---' line; found {text[:60]!r}. Add "
                         "front matter (at least 'library_name: transformers') and run again.")
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as e:
        raise ValueError(f"{readme_path}: the front matter is not valid YAML ({e}). Fix the YAML "
                         "between the '---' lines and run again.") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{readme_path}: the front matter must be a YAML mapping (key: value), "
                         f"found a {type(data).__name__}. Fix it and run again.")
    return match, data or {}


def _result_key(r) -> tuple:
    return (r.task_type, r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type)


def _eval_result(result):
    """An `EvalResult` from one, or from a dict of its fields (finite value, plain Python number)."""
    from huggingface_hub import EvalResult

    if isinstance(result, EvalResult):
        return result
    fields = dict(result)
    value = fields.get("metric_value")
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        raise ValueError(f"metric_value must be finite for the model card, got {value} in {fields}")
    if isinstance(value, np.generic):
        fields["metric_value"] = value.item()
    try:
        return EvalResult(**fields)
    except TypeError as e:
        raise ValueError(f"bad model-card result {fields}: {e}. Give task_type, dataset_type, "
                         "dataset_name, metric_type, metric_value (and optionally dataset_split, "
                         "metric_name, ...) as in huggingface_hub.EvalResult.") from None


def _replace_model_index(yaml_text: str, block: str, nl: str) -> str:
    """Swap the top-level `model-index:` entry of `yaml_text` for `block`, or append it.

    The entry is its key line plus the following indented, sequence ('-') and blank lines; every
    other line is kept as it was.
    """
    lines = yaml_text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("model-index:")), None)
    if start is None:
        sep = "" if not lines or lines[-1].endswith(("\n", "\r")) else nl
        return yaml_text + sep + block.rstrip("\r\n")
    end = start + 1
    while end < len(lines) and (lines[end][:1] in (" ", "\t", "-") or not lines[end].strip()):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines before the next key stay
        end -= 1
    sep = nl if lines[end - 1].endswith(("\n", "\r")) else ""  # the last line has no newline
    return "".join(lines[:start]) + block.rstrip("\r\n") + sep + "".join(lines[end:])


def card_model_name(readme) -> str | None:
    """The card's current model-index name, or None (update_model_card explains a broken card)."""
    import yaml
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.model_name
    except (ValueError, yaml.YAMLError):
        return None


def update_model_card(readme_path, model_name: str, results: Sequence) -> Path:
    """Write evaluation results into the `model-index` of a README's YAML front matter.

    `results` are `EvalResult`s or dicts of their fields. A result with the same (task_type,
    dataset_type, dataset_config, dataset_split, metric_type) as an existing one replaces it in
    place; others are kept, new ones appended. Only the `model-index` entry of the front matter is
    rewritten: other keys, comments and the whole markdown body stay byte-identical. The file is
    replaced atomically. Raises ValueError when the front matter is missing or invalid, or the
    existing model-index cannot be parsed.
    """
    import yaml
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import eval_results_to_model_index
    from huggingface_hub.utils import yaml_dump

    readme_path = Path(readme_path)
    text = readme_path.read_bytes().decode("utf-8")
    match, data = _front_matter(text, readme_path)
    try:
        card = ModelCard(text)
    except ValueError as e:
        raise ValueError(f"{readme_path}: the existing front matter cannot be read as a model card "
                         f"({e}). Fix or remove its 'model-index' and run again.") from None
    results = [_eval_result(r) for r in results]
    local = [r.metric_name or r.metric_type for r in results if not r.dataset_type]
    if local:
        raise ValueError(f"{readme_path}: the results {', '.join(local)} have no Hub dataset (they were measured "
                         "on local data), and a model-index entry names the Hub dataset it was measured on. "
                         "Evaluate on the Hub dataset at a recorded revision to file them.")
    merged = list(card.data.eval_results or [])
    index = {_result_key(r): i for i, r in enumerate(merged)}
    for new in map(_eval_result, results):
        if _result_key(new) in index:
            merged[index[_result_key(new)]] = new
        else:
            index[_result_key(new)] = len(merged)
            merged.append(new)
    model_index = eval_results_to_model_index(model_name, merged)

    nl = match.group(1)[len(match.group(1).rstrip("\r\n")):]
    block = yaml_dump({"model-index": model_index}, sort_keys=False, line_break=nl)
    new_yaml = _replace_model_index(match.group(2), block, nl)
    if yaml.safe_load(new_yaml) != {**data, "model-index": model_index}:
        raise ValueError(f"{readme_path}: could not replace the 'model-index' entry of the front matter "
                         "in place (unusual layout?). Move 'model-index' to the end of the front matter "
                         "in block style, or delete it, and run again.")
    new_text = text[:match.start(2)] + new_yaml + text[match.end(2):]
    atomic_write_bytes(readme_path, new_text.encode("utf-8"))
    return readme_path
