"""Helpers shared by the tests: tiny random models, isolated interpreters, multi-process launches,
dataset corruption, training arguments. Fixtures built on them live in conftest.py."""

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nearid.hub import export_hub_folder
from nearid.numerics import cpu_threads

# datasets (and nearid.data.readers, which imports it) are imported by the helpers that use them: the
# processes that tests launch import this module too, and most need neither (seconds each).

REPO_ROOT = Path(__file__).resolve().parent.parent


TINY_VISION = dict(
    image_size=30,
    patch_size=2,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
)
TINY_TOKEN_SHAPE = ((TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2, TINY_VISION["hidden_size"])


def make_tiny_siglip(seed=0, **overrides):
    """A randomly initialised transformers `SiglipVisionModel` (with its MAP head), in eval mode."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(**{**TINY_VISION, **overrides})).eval()
    # SigLIP initialises the head's in_proj bias to zero; make it non-trivial so tests see it.
    with torch.no_grad():
        siglip_tower(model).head.attention.in_proj_bias.normal_(std=0.1)
    return model


def siglip_tower(siglip_vision_model):
    """The module holding embeddings/encoder/head: nested as `.vision_model` in transformers 4.x only."""
    return getattr(siglip_vision_model, "vision_model", siglip_vision_model)


def make_tiny_nearid(seed=0):
    from modeling_nearid import NearIDModel

    return NearIDModel.from_siglip(make_tiny_siglip(seed)).eval()


def rounded_tiny_nearid():
    """The fp32 model (eval mode) that the exported fp16 weights of `make_tiny_nearid()` round to."""
    rounded = make_tiny_nearid()
    rounded.load_state_dict({k: v.half().float() for k, v in rounded.state_dict().items()})
    return rounded.eval()


def make_tiny_processor(resample=2):
    from image_processing_nearid import NearIDImageProcessor

    size = TINY_VISION["image_size"]
    return NearIDImageProcessor(size={"height": size, "width": size}, resample=resample)


def random_pixels(batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    size = TINY_VISION["image_size"]
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def noise(height, width, channels=3, seed=0):
    """A random uint8 image array (`channels` 0: one plane, no channel axis)."""
    shape = (height, width, channels) if channels else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def python_path():
    """PYTHONPATH for a subprocess running a script outside the repository: the repository first."""
    return os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))


def run_isolated(code, tmp_path, extra_env=None, timeout=300):
    """Run python `code` in a fresh interpreter with an empty remote-code cache and the Hub offline.

    This is how a user meets the repo: transformers copies the remote code into HF_MODULES_CACHE
    and imports it from there, never from this checkout.
    """
    env = dict(os.environ)  # PYTHONPATH may select the transformers under test; the checkout is not on it
    env.update(
        OMP_NUM_THREADS=str(torch.get_num_threads()),  # this process's arithmetic (one thread: conftest.py)
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    env.update(extra_env or {})
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


# Runs each check of CHECKS ({name: [working folder, code]}) in turn, in its own folder and namespace, and writes
# {name: {"stdout", "error" (its traceback or None), "imported" (the remote-code modules it imported itself),
# "transformers" (the version of the transformers it ran on, None if none was imported)}}.
_CHECKS_DRIVER = """
import contextlib, io, json, os, sys, traceback
results = {}
for name, (folder, code) in json.loads(CHECKS).items():
    os.chdir(folder)
    before = set(sys.modules)
    printed, error = io.StringIO(), None
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, name, "exec"), {"__name__": "__main__"})
    except Exception:
        error = traceback.format_exc()
    imported = sorted(m for m in set(sys.modules) - before if m.startswith("transformers_modules."))
    transformers = getattr(sys.modules.get("transformers"), "__version__", None)
    results[name] = {"stdout": printed.getvalue(), "error": error, "imported": imported, "transformers": transformers}
os.chdir(ROOT)
with open("checks.json", "w") as file:
    json.dump(results, file)
"""


class IsolatedCheck:
    """One check's outcome from `run_isolated_checks`: its working folder, what it printed (`stdout` raises its
    traceback if it failed), the remote-code modules (`transformers_modules.*`) it imported itself, not
    found already imported by an earlier check, and the transformers version it ran on."""

    def __init__(self, name, folder, stdout, error, imported, transformers):
        self.name, self.folder, self.error, self.imported = name, Path(folder), error, imported
        self.transformers = transformers
        self._stdout = stdout

    @property
    def stdout(self):
        if self.error:
            raise AssertionError(f"check {self.name!r} failed in the fresh interpreter:\n{self._stdout}\n{self.error}")
        return self._stdout

    def imported_remote_code(self, *files):
        """Whether this check imported each of these remote-code files (e.g. "modeling_nearid") itself."""
        return all(any(module.endswith(f".{file}") for module in self.imported) for file in files)


def run_isolated_checks(checks, tmp_path):
    """Run several checks, `{name: (working folder, python code)}`, one after another in one `run_isolated`
    interpreter (one start instead of one each) -> `{name: IsolatedCheck}`. A check that fails is reported
    under its name; the others still run."""
    serialised = json.dumps({name: [str(folder), code] for name, (folder, code) in checks.items()})
    driver = f"CHECKS = {serialised!r}\nROOT = {str(tmp_path)!r}\n{_CHECKS_DRIVER}"
    run_isolated(driver, tmp_path)
    results = json.loads((tmp_path / "checks.json").read_text())
    return {name: IsolatedCheck(name, checks[name][0], **result) for name, result in results.items()}


def rewrite(dataset_dir, target, change):
    """Save `change(dataset)` of the save_to_disk folder `dataset_dir` as a new folder `target`."""
    import datasets

    change(datasets.load_from_disk(str(dataset_dir))).save_to_disk(str(target))
    return target


def corrupt_image(dataset, row, column):
    """`dataset` with the encoded image at (row, column) replaced by bytes PIL cannot open."""
    import datasets

    from nearid.data import readers

    def garble(example, index):
        if index == row:
            example[column] = {"bytes": b"these bytes are not an image", "path": None}
        return example

    raw = readers.undecoded(dataset, [column])
    return raw.map(garble, with_indices=True).cast_column(column, datasets.Image())


def present(dataset, column):
    from nearid.data import readers

    return [ref is not None for ref in readers.image_refs(dataset, column, range(len(dataset)))]


def drop_column(column):
    return lambda dataset: dataset.remove_columns([column])


def change_id(row):
    return lambda dataset: dataset.map(lambda e, i: {"id": "someone_else" if i == row else e["id"]}, with_indices=True)


def launch(num_processes, script_args, tmp_path, log_name, timeout=300):
    """Run `script_args` (a script and its arguments) on `num_processes` CPU processes, for `timeout` s at most.

    One thread per process whatever the process count, so one and two processes do the same
    arithmetic. The remote-code module cache (HF_MODULES_CACHE) is `tmp_path`/hf_modules. Returns the
    exit code and the combined output.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH=python_path(),
               HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(num_processes), *map(str, script_args)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    (tmp_path / log_name).write_text(output)
    return result.returncode, output


# torchrun's report of each failed process: "exitcode  : -6 (pid: ...)", negative for a process killed by a
# signal, as CPU (gloo) process groups sometimes are at exit after the work is done.
EXIT_CODE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)", re.M)


def assert_finished(code, output, complete, exit_status=0):
    """A launched run (`launch`) exited 0, or each of its failed processes was killed by a signal (the known
    exit-time abort) after the results were written: `complete` says they are all there, and the caller
    then checks their contents. A process that exits with an error (a status, not a signal) fails the run
    whatever it wrote.

    `exit_status` 1: the run ends every process with a command's user error on purpose (the caller's
    `complete` includes each process's message), so the launch fails, and each failed process exited with
    that status, or was killed by a signal (torchrun stops the others once one has failed)."""
    assert complete, f"the run's results are missing, exit code {code}:\n{output[-4000:]}"
    if code == 0 and exit_status == 0:
        return
    codes = [int(found) for found in EXIT_CODE.findall(output)]  # torchrun lists the processes that failed
    assert code != 0 and codes and all(found < 0 or found == exit_status for found in codes), \
        f"exit code {code}, not status {exit_status} or the known exit-time abort:\n{output[-4000:]}"


def train_args(train_synthetic, base_model, out, *extra):
    return ["--positives", str(train_synthetic / "positives"), "--source", f"flux={train_synthetic / 'flux'}",
            "--source", f"sdxl={train_synthetic / 'sdxl'}", "--mtg", str(train_synthetic / "mtg"),
            "--val-split", str(train_synthetic / "splits" / "val.json"),
            "--test-split", str(train_synthetic / "splits" / "test.json"),
            "--base-model", str(base_model), "--output-dir", str(out), "--per-device-batch-size", "4",
            "--num-epochs", "2", "--warmup-steps", "2", "--learning-rate", "1e-3", "--log-steps", "1",
            "--batch-size", "16", *extra]


def logged_losses(out):
    lines = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    return [(line["step"], line["loss"]) for line in lines if "loss" in line]


class PatchTokens:
    """A stand-in for the tiny NearID backbone where only the store is under test: `forward_features` maps pixels
    [B, 3, 30, 30] to tokens [B, *TINY_TOKEN_SHAPE], each 2x2 patch through one fixed random projection. It is
    torch alone, so a launched process that computes with it imports no transformers (3 CPU-seconds)."""

    def __init__(self, seed=0):
        patch = TINY_VISION["patch_size"]
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(3 * patch * patch, TINY_VISION["hidden_size"], generator=generator)

    def forward_features(self, pixels):
        patch = TINY_VISION["patch_size"]
        patches = torch.nn.functional.unfold(pixels, kernel_size=patch, stride=patch)  # [B, 3 * patch**2, tokens]
        return patches.transpose(1, 2) @ self.weight


class Counting:
    """An encoder around `model.forward_features` that counts images (and can fail on a later batch)."""

    def __init__(self, model, fail_after_batches=None):
        self.model, self.fail_after_batches = model, fail_after_batches
        self.images = self.batches = 0

    def encode(self, pixels):
        if self.fail_after_batches is not None and self.batches == self.fail_after_batches:
            raise RuntimeError("simulated interruption")
        self.images += len(pixels)
        self.batches += 1
        with torch.no_grad():
            return self.model.forward_features(pixels)


def assert_waits(thread, caplog, message, timeout=60):
    """`thread` is a second writer that must wait for the first (who is paused): it says `message` in the log
    when it finds the lock taken, and is still waiting a moment later."""
    deadline = time.monotonic() + timeout
    while message not in caplog.text and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert message in caplog.text, f"the second run did not find the lock taken: {caplog.text!r}"
    thread.join(timeout=0.5)
    assert thread.is_alive(), "the second run did not wait for the first"


def load_pixels(item):
    """The test loader: deterministic pixels per seed, zeros for the pad slot, ValueError for a corrupt item."""
    if item.get("corrupt"):
        raise ValueError(f"cannot decode image at {item['where']}: truncated file")
    if item.get("pad"):
        return torch.zeros(3, TINY_VISION["image_size"], TINY_VISION["image_size"])
    return random_pixels(batch=1, seed=item["seed"])[0]


def make_items(count, corrupt=()):
    items = {f"img-{i:02d}": {"seed": 100 + i, "where": f"pairs row {i} column image"} for i in range(count)}
    items["pad"] = {"pad": True, "where": "padding slot"}
    for key in corrupt:
        items[key] = {"corrupt": True, "where": f"pairs row {key} column image"}
    return items


class PixelScorer:
    """A scorer whose embedding is an image's own pixels (centred on 128, flattened, L2-normalised): a test
    chooses the embeddings by drawing them (`draw_vector`), so it knows the answers. It goes wherever a
    `nearid.scorers.Scorer` goes, through the same decode and embed-once store."""

    kind_name = spec = "pixels"
    device = "cpu"

    def __init__(self, side=3):
        from nearid.store.format import StoreFormat

        self.format, self.fingerprint = StoreFormat((3 * side * side,)), f"pixels-{side}x{side}"

    def loader(self, item):
        from nearid.images import load_image

        ref, where = item
        return torch.from_numpy(np.asarray(load_image(ref, name=where), np.float32).reshape(-1) - 128)

    def encode(self, pixels):
        return torch.nn.functional.normalize(pixels.float(), dim=-1)

    def provenance(self):
        return {"spec": self.spec, "fingerprint": self.fingerprint, "revision": None, "dtype": "float32"}


def draw_vector(vector, side=3):
    """The PIL image whose `PixelScorer(side)` embedding points along `vector` (3 * side**2 values in [-1, 1])."""
    from PIL import Image

    pixels = np.clip(np.round(128 + 127 * np.asarray(vector, dtype=float)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels.reshape(side, side, 3))


def user_error(capsys, main, argv, status=1):
    """Run a command's `main(argv)` expecting a user mistake: exit status `status`, no traceback, a message
    of a few lines on stderr. Returns that message."""
    import pytest

    capsys.readouterr()  # drop earlier output
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    output = capsys.readouterr().err
    assert exit_.value.code == status, output
    assert "Traceback" not in output, output
    # Progress bars may come before it; the error itself is the last few lines, from "error:" on.
    start = output.rfind("error: ")
    message = output[start:]
    assert start >= 0 and 0 < len(message.strip().splitlines()) <= 4, output
    return message


# Model cards: what an exported repo's card is built from in the card and hub tests.
REPO_ID = "someone/nearid-test"
TRAINING_ARGS = {
    "learning_rate": 1e-4,
    "weight_decay": 1e-4,
    "num_epochs": 11,
    "per_device_batch_size": 128,
    "mixed_precision": "fp16",
    "train_sources": ["flux", "sdxl", "qwen"],
    "resume_from": None,
}
EVAL_RESULTS = [
    dict(task_type="image-feature-extraction", dataset_type="Aleksandar/NearID", dataset_name="NearID",
         dataset_split="test", metric_type="ssr", metric_name="NearID SSR", metric_value=97.25),
    dict(task_type="image-feature-extraction", dataset_type="abdo-eldesokey/mtg-dataset", dataset_name="MTG",
         dataset_split="test", metric_type="pa", metric_name="MTG PA", metric_value=41.5),
]


HUB_COMMIT = "c0ffee00" * 5  # the commit the served datasets below are "read at"


def serve_as_hub_datasets(monkeypatch, folders):
    """`datasets.load_dataset(<Hub id>)` answers from local save_to_disk folders, as the Hub would.

    folders: Hub id -> folder. Returns {Hub id: "<id>@HUB_COMMIT"}, source arguments that pin the
    commit, so that what is read is recorded as the Hub dataset at that commit. Other paths are
    loaded as before. Tests serve small data under ids of their own (someone/nearid-mini...), not
    Aleksandar/NearID: that id gets the published splits of its 19,386 rows by default.
    """
    import datasets

    real = datasets.load_dataset

    def load_dataset(path, *args, split=None, revision=None, **kwargs):
        if path not in folders:
            return real(path, *args, split=split, revision=revision, **kwargs)
        assert revision == HUB_COMMIT, f"{path} read at {revision}, not at the served commit"
        loaded = datasets.load_from_disk(str(folders[path]))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return {hub_id: f"{hub_id}@{HUB_COMMIT}" for hub_id in folders}


def card_kwargs(**overrides):
    return {"repo_id": REPO_ID, "base_model": "google/siglip2-so400m-patch14-384",
            "datasets": ["Aleksandar/NearID", "Aleksandar/NearID-Flux"], "training_args": TRAINING_ARGS,
            "results": EVAL_RESULTS, **overrides}


def export_with_card(folder, **overrides):
    return export_hub_folder(make_tiny_nearid(), make_tiny_processor(), folder, model_card=card_kwargs(**overrides))


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_training_at_step(monkeypatch, step):
    """Make the training loop's `step`-th call of `train_step` (counted from now) raise KeyboardInterrupt, as a
    kill would."""
    from nearid.training import loop

    real_step, calls = loop.train_step, {"n": 0}

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", killed)
    return real_step


def reset_accelerator_state():
    """accelerate's process-wide state (AcceleratorState, PartialState) back to a fresh process's: the next
    Accelerator or PartialState sets it up again. It does not join a launch's processes again after
    `Accelerator.end_training` shut torch.distributed down (tests/commands_worker.py `rejoin_launch` does)."""
    if "accelerate.state" in sys.modules:  # accelerate not imported yet: nothing to reset
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)


def single_threaded():
    """One torch thread, as every process of `launch` runs: a 1-process run in this process then does the
    same arithmetic as the launched processes, bit for bit."""
    return cpu_threads(1)


def make_hostile(model_folder, parent):
    """A copy of `model_folder` armed as an attacker would arm a model repo; returns (folder, markers).

    Its `configuration_nearid.py`, `modeling_nearid.py` and `image_processing_nearid.py` are working
    NearID code that first writes a marker file into `markers` when imported; config.json's auto_map
    points AutoModel at a module in a folder outside the repo (an absolute path, armed the same way)
    and preprocessor_config.json's at another Hub repo's code. Loading it must leave `markers` empty.
    The folder's name is unique, so transformers' module cache never answers from an earlier test.
    """
    import shutil
    import uuid

    name = f"hostile-{uuid.uuid4().hex[:8]}"
    folder, outside, markers = Path(parent) / name, Path(parent) / f"{name}-outside", Path(parent) / f"{name}-markers"
    shutil.copytree(model_folder, folder)
    outside.mkdir()
    markers.mkdir()

    def arm(target, source_name):
        mark = f"import pathlib\npathlib.Path({str(markers)!r}, {target.name!r}).write_text('imported')\n"
        target.write_text(mark + (REPO_ROOT / source_name).read_text())

    for code in ("configuration_nearid.py", "modeling_nearid.py", "image_processing_nearid.py"):
        arm(folder / code, code)
    arm(outside / "configuration_nearid.py", "configuration_nearid.py")
    arm(outside / "modeling_outside.py", "modeling_nearid.py")
    for file, auto_map in (("config.json", {"AutoConfig": "configuration_nearid.NearIDConfig",
                                            "AutoModel": f"{outside}--modeling_outside.NearIDModel"}),
                           ("preprocessor_config.json", {"AutoImageProcessor":
                                                         "other/repo--image_processing_nearid.NearIDImageProcessor"})):
        config = json.loads((folder / file).read_text())
        (folder / file).write_text(json.dumps({**config, "auto_map": auto_map}))
    return folder, markers


def markers_written(markers):
    return sorted(p.name for p in Path(markers).iterdir())



def project_requirements() -> dict:
    """pyproject.toml's runtime requirements: {lower-case package name: its version specifier}."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (the test extra installs it there)
        import tomli as tomllib

    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pairs = (re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", line).groups() for line in dependencies)
    return {name.lower(): specifier.split(";")[0].strip() for name, specifier in pairs}


@contextlib.contextmanager
def unchanged(folder):
    """Yield `folder`, then check that no file in it was changed, removed or added meanwhile: for folders
    shared by many tests (conftest.py's session fixtures), which a test must copy before damaging.
    datasets' own cache files (`cache-*.arrow`, written beside a loaded dataset by `map`) may appear."""

    def listing():
        return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(Path(folder).rglob("*")) if p.is_file() and not p.name.startswith("cache-")}

    before = listing()
    yield folder
    after = listing()
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"tests changed the shared folder {folder}: {changed[:10]}"
