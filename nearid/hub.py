"""Publish NearID: a complete Hub repo folder (weights, configs, remote code, model card), and its upload.

A folder written here loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)` and
`AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)`, locally or after an upload.

- `export_hub_folder`: weights, configs and the remote code, plus optionally the model card, moved
  into place in one step.
- `push_to_hub`: upload a complete folder to the Hub in one commit. Also a command:
  `python -m nearid.hub push --folder F --repo-id ID [--private] [--revision R] [--commit-message M]`.
- `push_space`: upload the web app (space/ with the nearid package and the model code) to a Gradio
  Space in one commit: `python -m nearid.hub push-space --repo-id ID [--private]`.
"""

import json
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nearid.card import check_card_metadata, write_model_card
from nearid.cli import REQUIRED, build_parser, option, parse, user_errors
from nearid.io import replacing_folder
from nearid.resources import REMOTE_CODE_FILES, checkout_root, remote_code_file

REQUIRED_REPO_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", *REMOTE_CODE_FILES)
AUTO_MAP = {
    "AutoConfig": "configuration_nearid.NearIDConfig",
    "AutoModel": "modeling_nearid.NearIDModel",
    "AutoImageProcessor": "image_processing_nearid.NearIDImageProcessor",
}
PROCESSOR_AUTO_MAP = {"AutoImageProcessor": AUTO_MAP["AutoImageProcessor"]}

DEFAULT_COMMIT_MESSAGE = "Upload NearID model"
# Folders the Hub refuses in a commit; upload_folder skips them too.
SKIPPED_FOLDERS = {".git", ".cache"}


# --------------------------------------------------------------------------------------------------
# Export


def export_hub_folder(model, image_processor, folder, dtype=torch.float16, overwrite=False,
                      model_card: dict | None = None):
    """Save `model` (weights cast to `dtype`, published key layout) and `image_processor` as a Hub repo.

    model_card: keyword arguments of `nearid.card.write_model_card` (base_model, datasets,
    training_args, results, ...); when given, the folder also gets its README.md model card.

    The folder is assembled next to its destination and moved into place at the end, so an
    interrupted export never leaves a half-written repo where a complete one is expected.
    Returns the folder path.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{folder} already exists and is not empty. Choose another folder or pass overwrite=True."
        )
    with replacing_folder(folder) as staging:
        _write_folder(model, image_processor, staging, dtype)
        if model_card is not None:
            # The staging folder has a temporary name: name the card after the destination.
            write_model_card(staging, **{"model_name": model_card.get("repo_id") or folder.name, **model_card})
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
        shutil.copyfile(remote_code_file(Path(name).stem), folder / name)


def _patch_json(path, updates):
    data = json.loads(path.read_text())
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# Upload


class HubPushError(OSError):
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

    The folder is checked (complete, and its README.md's metadata passes
    `nearid.card.check_card_metadata`) and a token found before anything is sent. Nothing in the
    folder is changed, whatever happens; on failure a `HubPushError` gives the command that
    retries the upload.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    validate_repo_id(repo_id)
    paths = repo_files(folder)
    if "README.md" in paths:  # the Hub refuses some metadata only after the upload; find it first
        check_card_metadata(folder / "README.md")
    retry = push_command(folder, repo_id, private=private, revision=revision,
                         commit_message=commit_message, create_pr=create_pr)
    token = _write_token(token, str(folder), retry)
    info = _commit(HfApi(token=token), repo_id, _additions(folder, paths), "model", str(folder), retry,
                   private=private, revision=revision, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                   create_pr=create_pr)
    return info.pr_url if create_pr and info.pr_url else info.commit_url


def _write_token(token: str | None, what: str, retry: str) -> str:
    """`token`, or else the one huggingface_hub finds (HF_TOKEN, then the token of `hf auth login`).

    Raises HubPushError, before any request, when there is none: it says how to log in and gives the
    command `retry` that uploads `what` afterwards.
    """
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubPushError(
            f"No Hugging Face token found, so nothing was uploaded. Log in with `hf auth login` or set the "
            f"HF_TOKEN environment variable to a token with write access "
            f"(https://huggingface.co/settings/tokens), then upload {what} with:\n  {retry}")
    return token


def _commit(api, repo_id, operations, repo_type, what, retry, *, private, revision=None, commit_message,
            create_pr=False, space_sdk=None):
    """Create the repo if missing (and the branch), then commit `operations` in one commit; any failure is a
    HubPushError saying that `what` is intact and how to retry."""
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=True if private else None, exist_ok=True,
                        **({"space_sdk": space_sdk} if space_sdk else {}))
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        # create_commit, not upload_folder: with hf_xet installed, upload_folder may split a folder
        # into several commits ("(part N)") and retries a failed commit POST, which can duplicate it.
        return api.create_commit(repo_id, operations=operations, repo_type=repo_type, commit_message=commit_message,
                                 revision=revision, create_pr=create_pr)
    # Any failure here (HTTP status, network, metadata refused by the Hub) leaves the same way out:
    # the local files are intact and the same command retries; the original error is chained.
    except Exception as e:
        raise HubPushError(
            f"Uploading {what} to {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            f"The local files ({what}) are intact (nothing in them was changed). Once the cause is fixed, "
            f"retry the upload with:\n  {retry}") from e


# --------------------------------------------------------------------------------------------------
# The web app as a Hub Space


DEFAULT_SPACE_COMMIT_MESSAGE = "Upload the NearID app"


def space_files() -> dict:
    """{path in the Space repo: local file}: the app folder's files (app.py, its README.md with the Space's
    front matter, requirements.txt) at the root, with the `nearid` package and the model code beside them."""
    root = checkout_root()
    if root is None:  # the app folder is not part of the installed package
        raise FileNotFoundError("the web app's files (space/) are in a clone of the NearID repository, not in the "
                                "installed package: run push-space from a clone")
    files = {p.name: p for p in sorted((root / "space").iterdir()) if p.is_file()}
    package = root / "nearid"
    files.update({p.relative_to(root).as_posix(): p for p in sorted(package.rglob("*")) if p.is_file()
                  and "__pycache__" not in p.parts and p.suffix in (".py", ".json", ".md")})
    files.update({name: remote_code_file(Path(name).stem) for name in REMOTE_CODE_FILES})
    return files


def push_space(repo_id: str, *, private: bool = False, commit_message: str | None = None,
               token: str | None = None) -> str:
    """Upload the web app to the Hub Space `repo_id` (created as a Gradio Space if missing) in one commit.

    The Space runs `app.py` on the model of its NEARID_MODEL variable (default the published NearID).
    Returns the URL of the commit; on failure a `HubPushError` gives the command that retries.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    retry = shlex.join(["python", "-m", "nearid.hub", "push-space", "--repo-id", repo_id, *(["--private"] if private
                                                                                            else [])])
    what = "the app (space/ and the nearid package)"
    token = _write_token(token, what, retry)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local))
                  for path, local in space_files().items()]
    info = _commit(HfApi(token=token), repo_id, operations, "space", what, retry, private=private,
                   commit_message=commit_message or DEFAULT_SPACE_COMMIT_MESSAGE, space_sdk="gradio")
    return info.commit_url


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
    args = ["python", "-m", "nearid.hub", "push", "--folder", str(Path(folder).resolve()), "--repo-id", repo_id]
    if private:
        args.append("--private")
    if create_pr:
        args.append("--create-pr")
    if revision is not None:
        args += ["--revision", revision]
    if commit_message is not None:
        args += ["--commit-message", commit_message]
    command = shlex.join(args)
    # From a clone, `-m nearid.hub` finds the package from the repository root; installed, from anywhere.
    root = checkout_root()
    return command if root is None or Path.cwd().resolve() == root else f"cd {shlex.quote(str(root))} && {command}"


@dataclass
class PushArguments:
    """Upload"""

    folder: str = option(REQUIRED, "the exported repo folder (train.py writes OUTPUT_DIR/release)")
    repo_id: str = option(REQUIRED, "Hub model repo, namespace/name (created if missing)")
    private: bool = option(False, "create the repo as private")
    revision: str | None = option(None, "branch to commit to (created if missing; default main)")
    commit_message: str | None = option(None, f"the commit's title (default {DEFAULT_COMMIT_MESSAGE!r})")
    create_pr: bool = option(False, "open a pull request instead of committing")


@dataclass
class PushSpaceArguments:
    """Upload the web app"""

    repo_id: str = option(REQUIRED, "Hub Space, namespace/name (created as a Gradio Space if missing)")
    private: bool = option(False, "create the Space as private")
    commit_message: str | None = option(None, f"the commit's title (default {DEFAULT_SPACE_COMMIT_MESSAGE!r})")


def main(argv=None) -> int:
    """`python -m nearid.hub push --folder F --repo-id ID` or `push-space --repo-id ID`: prints the commit URL;
    exit status 1 on failure."""
    groups_of = {"push": (PushArguments,), "push-space": (PushSpaceArguments,)}
    commands = {"push": ("upload a complete repo folder to the Hub in one commit", None, groups_of["push"]),
                "push-space": ("upload the web app (space/) to a Hub Space in one commit", None,
                               groups_of["push-space"])}
    parser = build_parser("python -m nearid.hub", __doc__.splitlines()[0], commands=commands)
    command, groups, debug = parse(parser, groups_of, argv)
    with user_errors(debug):
        if command == "push-space":
            args = groups[PushSpaceArguments]
            url = push_space(args.repo_id, private=args.private, commit_message=args.commit_message)
        else:
            args = groups[PushArguments]
            url = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                              commit_message=args.commit_message, create_pr=args.create_pr)
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
