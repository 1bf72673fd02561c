"""Finding and loading models without running a model repo's code.

A NearID repo ships `configuration_nearid.py`, `modeling_nearid.py` and `image_processing_nearid.py`
so that plain transformers users can load it with `trust_remote_code=True`. The tools of this
project never run those files: a NearID model is built by this checkout's own `NearIDConfig`,
`NearIDModel` and `NearIDImageProcessor` from the repo's JSON configs and safetensors weights alone,
which are data. From the Hub only those files are downloaded; a repo whose `*_nearid.py` differ from
this checkout's is loaded all the same, with a warning naming the files and the revision.

- `ModelSource`: a model as given, `MODEL[@REV]` (a Hub id or a local folder, and a Hub revision),
  resolved once to a `ResolvedModel`: the local folder and the commit it is (None for a local folder).
- `resolve_model_folder`: a local folder as is, a Hub id downloaded (or read from the cache).
- `load_nearid`: (NearIDModel, NearIDImageProcessor) from a NearID model folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch

from nearid.hub_ids import is_hub_id, split_revision
from nearid.integrity import check_weights
from nearid.resources import REMOTE_CODE_FILES, remote_code_file

# Everything a model load reads: configs and weights, never code, never pickle.
MODEL_FILES = ("config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json")
SIGLIP_TYPES = ("siglip", "siglip_vision_model")
logger = logging.getLogger(__name__)
_warned_code = set()  # (folder or Hub id, commit) pairs already compared


# --------------------------------------------------------------------------------------------------
# Finding a model: a local folder or a Hub snapshot, with errors that say which it was


@dataclass(frozen=True)
class ModelSource:
    """A model as given: a Hub id or a local folder, and a Hub revision (branch, tag or commit) or None."""

    location: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str, revision: str | None = None, flag: str = "--model") -> "ModelSource":
        """`MODEL` or `MODEL@REV`; `revision` (a separate revision flag) pins the same way, and may not
        contradict an @REV."""
        location, pinned = split_revision(str(text))
        if pinned and revision and pinned != revision:
            raise ValueError(f"{flag} {text} pins the revision {pinned!r}, and the revision flag gives {revision!r}; "
                             f"give the revision once, as {flag} {location}@REV")
        return cls(location, pinned or revision)

    def resolve(self) -> "ResolvedModel":
        """The folder and commit this source names now (a Hub id downloaded, or read from the cache)."""
        return ResolvedModel(self, *resolve_model_folder(self.location, self.revision))

    def __str__(self) -> str:
        return self.location if self.revision is None else f"{self.location}@{self.revision}"


@dataclass(frozen=True)
class ResolvedModel:
    """A `ModelSource` resolved once: the local folder its files are in, and the Hub commit (None for a local
    folder). Everything a run records about its model (provenance, model card, resume key) comes from here."""

    source: ModelSource
    folder: Path
    commit: str | None

    @property
    def name(self) -> str:
        return self.source.location

    def provenance(self) -> dict:
        """{"name_or_path", "revision", "commit"}; a revision pins Hub ids only, so a local folder has none."""
        return {"name_or_path": self.name, "revision": self.source.revision if self.commit else None,
                "commit": self.commit}


def resolve_model_folder(name_or_path: str, revision: str | None = None) -> tuple:
    """(local folder, commit hash or None): a folder as is; a Hub id downloaded (or from the cache).

    From the Hub only `MODEL_FILES` are downloaded. The snapshot folder of a Hub download is named
    by its commit hash, so the revision that was actually used is known exactly, whatever branch or
    tag was asked for. A revision has no meaning for a local folder and is ignored there, as
    transformers' `from_pretrained` does.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path, None
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"no such folder {name_or_path!r} (looked for {path.resolve()}), and it is not a Hub "
                                "model id (owner/name). Check the path.")
    folder = _download(name_or_path, revision, path)
    return folder, folder.name


def _download(repo_id: str, revision: str | None, local: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    not_local = f"There is no local folder {str(local)!r} either."
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILES)))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"cannot download the model {repo_id!r}: the Hugging Face Hub is not reachable (or HF_HUB_OFFLINE=1 is "
            f"set) and it is not in the local cache. {not_local} Pass a local folder with the model files, or "
            "download it where the Hub is reachable and run with HF_HUB_OFFLINE=1.") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"the Hub model {repo_id!r} has no revision {revision!r}; give a branch, tag or "
                                "commit hash that exists") from None
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise FileNotFoundError(f"the Hub has no model {repo_id!r} (or it is private: log in with `hf auth login`). "
                                f"{not_local} Check the id or the path.") from None


def model_config(folder: Path) -> dict:
    """The folder's config.json as a dict (read as data: nothing in it is imported)."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json, so it is not a model folder; give a NearID model "
                                "exported by train.py or nearid.hub.export_hub_folder")
    return json.loads(config_path.read_text(encoding="utf-8"))


def has_safetensors(folder: Path) -> bool:
    return (Path(folder) / "model.safetensors").is_file() or (Path(folder) / "model.safetensors.index.json").is_file()


# --------------------------------------------------------------------------------------------------
# NearID with this checkout's code


def check_nearid_folder(folder: Path, name: str | None = None) -> None:
    """Refuse a folder that is not a NearID model with safetensors weights, saying what to give instead."""
    name = name or str(folder)
    model_type = model_config(folder).get("model_type")
    if model_type in SIGLIP_TYPES:
        raise ValueError(f"{name} is a SigLIP model (model_type {model_type!r}), not a NearID model. To score with "
                         f"SigLIP's own embedding, give it as a baseline: siglip:{name}")
    if model_type != "nearid":
        raise ValueError(f"{name} is not a NearID model (config.json has model_type {model_type!r}, not 'nearid'). "
                         "Give a NearID model, or a baseline as KIND:MODEL (clip:, dinov2:, dinov3:, siglip:, "
                         "siglip-mean:).")
    if not has_safetensors(folder):
        raise FileNotFoundError(
            f"{name} has no safetensors weights (model.safetensors), so it is not loaded: NearID reads weights only "
            "from safetensors, which cannot run code (pickled .bin files can). Re-export the model with "
            "nearid.hub.export_hub_folder, or convert its weights to safetensors.")


def load_nearid(folder: Path, dtype=torch.float32, name: str | None = None, commit: str | None = None):
    """(NearIDModel, NearIDImageProcessor) of a NearID model folder, built by this checkout's classes.

    Only config.json, preprocessor_config.json and the safetensors weights are read. The folder's own
    `*_nearid.py` are never imported (`trust_remote_code=False` holds by construction: no Auto class
    looks at the folder's `auto_map`); when they differ from this checkout's, a warning says so.
    """
    from image_processing_nearid import NearIDImageProcessor
    from modeling_nearid import NearIDModel

    folder = Path(folder)
    check_nearid_folder(folder, name)
    check_weights(folder)  # a truncated weights file is named, not a raw SafetensorError traceback
    warn_if_code_differs(folder, name or str(folder), commit)
    model = NearIDModel.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
    processor = NearIDImageProcessor.from_pretrained(str(folder))
    return model, processor


def differing_code_files(folder: Path, name: str, commit: str | None = None) -> list:
    """The model's `*_nearid.py` files that differ from this checkout's (or that it does not have)."""
    ours = {name: git_blob_id(remote_code_file(Path(name).stem).read_bytes()) for name in REMOTE_CODE_FILES}
    theirs = {path.name: git_blob_id(path.read_bytes()) for path in Path(folder).glob("*_nearid.py")}
    if commit and is_hub_id(name):
        theirs.update(_hub_code_files(name, commit))
    return sorted(file for file, blob in theirs.items() if ours.get(file) != blob)


def git_blob_id(content: bytes) -> str:
    """The id git (and the Hub's file listing) gives a file's content."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _hub_code_files(repo_id: str, commit: str) -> dict:
    """{file: git blob id} of the repo's `*_nearid.py` at `commit`, from the Hub's file listing: nothing is
    downloaded. Offline (or on any Hub error) it is empty: the warning is a courtesy, never a reason to fail."""
    from huggingface_hub import HfApi

    try:
        entries = list(HfApi().list_repo_tree(repo_id, revision=commit))
    except Exception:  # offline, private, rate-limited: the model still loads from the files at hand
        return {}
    return {entry.path: entry.blob_id for entry in entries
            if fnmatch(entry.path, "*_nearid.py") and "/" not in entry.path and getattr(entry, "blob_id", None)}


def warn_if_code_differs(folder: Path, name: str, commit: str | None = None) -> None:
    """Warn once per model and revision when its `*_nearid.py` differ from the code that loads it."""
    key = (name if commit else str(Path(folder).resolve()), commit)
    if key in _warned_code:
        return
    _warned_code.add(key)  # compared once: a Hub id's file listing is asked for once per commit
    differing = differing_code_files(folder, name, commit)
    if not differing:
        return
    at = f" at commit {commit}" if commit else ""
    logger.warning(
        "%s%s ships %s, which differ from this NearID checkout's. Those files are not run: the model is loaded with "
        "this checkout's NearIDConfig, NearIDModel and NearIDImageProcessor from its configs and safetensors weights. "
        "If the model needs its own code, update this checkout to the release that wrote it.",
        name, at, ", ".join(differing))
