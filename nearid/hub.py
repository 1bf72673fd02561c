"""Publish NearID: a complete Hub repo folder (weights, configs, remote code, model card), and its upload.

A folder written here loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)` and
`AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)`, locally or after an upload.

- `export_hub_folder`: weights, configs and the remote code, plus optionally the model card, moved
  into place in one step.
- `write_model_card`: the README.md model card (front matter with `model-index`, quick start,
  training arguments, evaluation, citation).
- `push_to_hub`: upload a complete folder to the Hub in one commit. Also a command:
  `python -m nearid.hub push FOLDER --repo-id ID [--private] [--revision R] [--commit-message M]`.
"""

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import torch

from nearid.io import atomic_write_text
from nearid.reports import update_model_card

REPO_ROOT = Path(__file__).resolve().parent.parent  # the remote-code files live at the repository root
REMOTE_CODE_FILES = ("configuration_nearid.py", "modeling_nearid.py", "image_processing_nearid.py")
REQUIRED_REPO_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", *REMOTE_CODE_FILES)
AUTO_MAP = {
    "AutoConfig": "configuration_nearid.NearIDConfig",
    "AutoModel": "modeling_nearid.NearIDModel",
    "AutoImageProcessor": "image_processing_nearid.NearIDImageProcessor",
}
PROCESSOR_AUTO_MAP = {"AutoImageProcessor": AUTO_MAP["AutoImageProcessor"]}

LICENSE = "apache-2.0"
CARD_TAGS = ("identity", "image-similarity", "personalization", "siglip2", "custom_code")
PAPER_URL = "https://arxiv.org/abs/2604.01973"
CITATION = """\
@article{nearid2026,
  title   = {NearID: Identity Representation Learning via Near-identity Distractors},
  journal = {arXiv preprint arXiv:2604.01973},
  year    = {2026}
}"""
DEFAULT_COMMIT_MESSAGE = "Upload NearID model"
# Folders the Hub refuses in a commit; upload_folder skips them too.
SKIPPED_FOLDERS = {".git", ".cache"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # namespace/name


# --------------------------------------------------------------------------------------------------
# Export


def export_hub_folder(model, image_processor, folder, dtype=torch.float16, overwrite=False,
                      model_card: dict | None = None):
    """Save `model` (weights cast to `dtype`, published key layout) and `image_processor` as a Hub repo.

    model_card: keyword arguments of `write_model_card` (base_model, datasets, training_args, ...);
    when given, the folder also gets its README.md model card.

    The folder is assembled next to its destination and moved into place at the end, so an
    interrupted export never leaves a half-written repo where a complete one is expected.
    Returns the folder path.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{folder} already exists and is not empty. Choose another folder or pass overwrite=True."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _write_folder(model, image_processor, staging, dtype)
        if model_card is not None:
            # The staging folder has a temporary name: name the card after the destination.
            write_model_card(staging, **{"model_name": model_card.get("repo_id") or folder.name, **model_card})
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def _write_folder(model, image_processor, folder, dtype):
    original_dtype = model.dtype
    try:
        model.to(dtype).save_pretrained(folder, safe_serialization=True)
    finally:
        model.to(original_dtype)
    image_processor.save_pretrained(folder)
    _patch_json(folder / "config.json", {"auto_map": AUTO_MAP, "architectures": ["NearIDModel"]})
    _patch_json(folder / "preprocessor_config.json", {"auto_map": PROCESSOR_AUTO_MAP})
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REPO_ROOT / name, folder / name)


def _patch_json(path, updates):
    data = json.loads(path.read_text())
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# Model card


def write_model_card(folder, *, repo_id: str | None = None, base_model: str, datasets: Sequence[str],
                     training_args: Mapping, eval_results: Sequence[Mapping] | None = None,
                     summary_table: str | None = None, model_name: str | None = None) -> Path:
    """Write `folder/README.md`, the model card of an exported NearID repo.

    Args:
        folder: the repo folder; its config.json and preprocessor_config.json, when present, give
            the embedding size and input resolution shown in the card.
        repo_id: the Hub id the folder is published as, used in the quick start (without it the
            quick start loads from a placeholder folder path).
        base_model: the SigLIP checkpoint the backbone and the initial head come from.
        datasets: the training datasets (Hub ids or paths).
        training_args: argument name -> value, shown as a table in this order (for a dataclass of
            arguments, pass `dataclasses.asdict(args)`).
        eval_results: dicts of `huggingface_hub.EvalResult` fields, as `reports.update_model_card`
            takes; they become the front matter's `model-index`. None or empty: no evaluation.
        summary_table: markdown shown under "Evaluation" (e.g. `reports.table1_markdown`);
            without it, `eval_results` are listed there.
        model_name: the card's title and `model-index` name; default `repo_id`, else the folder's name.

    README.md is replaced in one step, complete with its `model-index`, or left as it was when an
    argument is refused. Returns its path.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder. write_model_card writes README.md into an exported "
                                "repo folder: export one first with export_hub_folder(model, processor, folder).")
    if not isinstance(training_args, Mapping):
        raise TypeError(f"training_args must be a dict of argument name -> value, got a "
                        f"{type(training_args).__name__}; for a dataclass pass dataclasses.asdict(args).")
    datasets = [str(datasets)] if isinstance(datasets, (str, Path)) else [str(d) for d in datasets]
    name = model_name or repo_id or folder.name
    text = _card_text(folder, name, repo_id, str(base_model), datasets, training_args, eval_results or [],
                      summary_table)
    readme = folder / "README.md"
    # update_model_card edits a card on disk: edit a draft, so README.md only ever changes once, complete.
    draft = folder / f".README.md.{secrets.token_hex(4)}.draft"
    try:
        atomic_write_text(draft, text)
        if eval_results:
            update_model_card(draft, name, eval_results)
        os.replace(draft, readme)
    finally:
        draft.unlink(missing_ok=True)
    return readme


def _card_text(folder, name, repo_id, base_model, datasets, training_args, eval_results, summary_table) -> str:
    from huggingface_hub.utils import yaml_dump

    metadata = {"library_name": "transformers", "pipeline_tag": "image-feature-extraction", "license": LICENSE,
                "base_model": base_model, "datasets": datasets, "tags": list(CARD_TAGS)}
    sections = [
        f"---\n{yaml_dump(metadata, sort_keys=False)}---",
        f"# {name}\n\n"
        "NearID scores whether two images show the **same object instance**, not just a similar scene: a "
        "frozen SigLIP2 vision encoder with a trained attention-pooling head, learned with near-identity "
        "distractors (a similar but different object inpainted into exactly the same background; "
        f"[arXiv 2604.01973]({PAPER_URL})). Use it to score identity preservation of personalized "
        "generation, or to retrieve and cluster images by identity.",
        _quick_start(repo_id),
        "## Model details\n\n" + _markdown_table(["", ""], _model_facts(folder, base_model)),
        "## Training\n\nDatasets:\n\n" + "".join(f"- {_hub_link(d, 'datasets/')}\n" for d in datasets)
        + "\nTraining arguments:\n\n"
        + _markdown_table(["argument", "value"], [(f"`{k}`", _code(v)) for k, v in training_args.items()]),
        "## Evaluation\n\n" + _evaluation_text(eval_results, summary_table),
        "## Limitations\n\n"
        "- The model judges object identity; it was trained on object-centric data and is not a face or "
        "person re-identification model.\n"
        "- Inputs are resized to a square without keeping the aspect ratio, as in training.\n"
        "- Scores are cosine similarities: compare them within one model, not across models.",
        f"## Citation\n\n```bibtex\n{CITATION}\n```",
    ]
    return "\n\n".join(sections) + "\n"


def _quick_start(repo_id) -> str:
    repo = json.dumps(repo_id or "path/to/this/folder")
    return f"""## Quick start

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


def _model_facts(folder, base_model) -> list:
    rows = [("base model", f"{_hub_link(base_model)}: the frozen vision encoder; the trained head starts "
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


def _evaluation_text(eval_results, summary_table) -> str:
    if summary_table:
        return summary_table.strip()
    if not eval_results:
        return "No evaluation was run for this export."
    rows = [(r.get("dataset_name", r.get("dataset_type", "")), r.get("dataset_split", ""),
             r.get("metric_name") or r.get("metric_type", ""), str(r.get("metric_value", "")))
            for r in eval_results]
    return _markdown_table(["dataset", "split", "metric", "value"], rows)


def _read_json(path) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def _hub_link(repo_id: str, prefix: str = "") -> str:
    """A link to the Hub page of `repo_id` (prefix "datasets/" for a dataset); a local path stays plain code."""
    if HUB_ID.fullmatch(repo_id) and not Path(repo_id).exists():
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
# Upload


class HubPushError(RuntimeError):
    """The folder was not (completely) uploaded; the message says why and how to retry."""


def push_to_hub(folder, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None, create_pr: bool = False) -> str:
    """Upload a complete repo folder (see `export_hub_folder`) to the Hub model repo `repo_id` in one commit.

    Args:
        folder: the repo folder; every file in it is uploaded (`.git` and `.cache` folders excepted).
        repo_id: "namespace/name"; the repo is created if it does not exist.
        private: create the repo as private (otherwise the Hub's default; an existing repo keeps
            its visibility).
        revision: the branch to commit to, created from the default branch if missing; None: main.
        commit_message: the commit's title; default "Upload NearID model".
        token: a Hub token with write access; default HF_TOKEN or the token of `hf auth login`.
        create_pr: open a pull request with the commit instead of committing to the branch.

    Returns the URL of the commit (of the pull request with `create_pr`).

    The folder is checked and a token found before anything is sent. Nothing in the folder is
    changed, whatever happens; on failure a `HubPushError` gives the command that retries the upload.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    validate_repo_id(repo_id)
    paths = repo_files(folder)
    retry = push_command(folder, repo_id, private=private, revision=revision,
                         commit_message=commit_message, create_pr=create_pr)
    token = token or get_token()
    if not token:
        raise HubPushError(
            f"No Hugging Face token found, so nothing was uploaded. Log in with `hf auth login` or set the "
            f"HF_TOKEN environment variable to a token with write access "
            f"(https://huggingface.co/settings/tokens), then upload {folder} with:\n  {retry}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        # create_commit, not upload_folder: with hf_xet installed, upload_folder may split a folder
        # into several commits ("(part N)") and retries a failed commit POST, which can duplicate it.
        info = api.create_commit(repo_id, operations=_additions(folder, paths), repo_type="model",
                                 commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                                 revision=revision, create_pr=create_pr)
    # Any failure here (HTTP status, network, metadata refused by the Hub) leaves the same way out:
    # the folder is intact and the same command retries; the original error is chained.
    except Exception as e:
        raise HubPushError(
            f"Uploading {folder} to {repo_id} failed: {type(e).__name__}: {e}\n"
            f"The local folder {folder} is intact (nothing in it was changed). Once the cause is fixed, "
            f"retry the upload with:\n  {retry}") from e
    return info.pr_url if create_pr and info.pr_url else info.commit_url


def repo_files(folder) -> list[str]:
    """The files of a complete repo folder to upload, as sorted repo paths.

    Raises FileNotFoundError naming every missing file of `REQUIRED_REPO_FILES`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder. Expected an exported NearID repo folder "
                                "(export_hub_folder or train.py writes one).")
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not SKIPPED_FOLDERS.intersection(p.relative_to(folder).parts))
    missing = [name for name in REQUIRED_REPO_FILES if name not in paths]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete NearID repo folder: missing {', '.join(missing)} (a complete one "
            f"has {', '.join(REQUIRED_REPO_FILES)}). Export it again with "
            "hub.export_hub_folder(model, processor, folder), then push.")
    return paths


def _additions(folder, paths):
    from huggingface_hub import CommitOperationAdd

    return [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path)) for path in paths]


def push_command(folder, repo_id, *, private=False, revision=None, commit_message=None, create_pr=False) -> str:
    """The shell command that runs `push_to_hub` with these arguments (the token is never part of it)."""
    args = ["python", "-m", "nearid.hub", "push", str(Path(folder).resolve()), "--repo-id", repo_id]
    if private:
        args.append("--private")
    if create_pr:
        args.append("--create-pr")
    if revision is not None:
        args += ["--revision", revision]
    if commit_message is not None:
        args += ["--commit-message", commit_message]
    command = shlex.join(args)
    # `-m nearid.hub` finds the package from the repository root.
    return command if Path.cwd().resolve() == REPO_ROOT else f"cd {shlex.quote(str(REPO_ROOT))} && {command}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="upload a complete repo folder to the Hub in one commit")
    push.add_argument("folder", help="the exported repo folder")
    push.add_argument("--repo-id", required=True, help="Hub model repo, namespace/name (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    push.add_argument("--commit-message", default=None, help=f"default: {DEFAULT_COMMIT_MESSAGE!r}")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    args = parser.parse_args(argv)
    try:
        url = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                          commit_message=args.commit_message, create_pr=args.create_pr)
    except (HubPushError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
