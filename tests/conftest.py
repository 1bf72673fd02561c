"""Shared fixtures: tiny random SigLIP towers, NearID models built from them, Hub-style folders.

The deterministic folders (`synthetic`, `train_synthetic`, `tiny_repo`, `base_model`) are built once per
session and shared by every module, so no test may change them: a test that damages data copies it
first. `unchanged` checks that at the end of the session.

`make test` runs the suite on two workers (pytest-xdist): see `pytest_configure` and
`pytest_xdist_make_scheduler` below.
"""

import gc
import os

# Collection imports torch, transformers, datasets and every test module: about half a million objects that live to
# the end. The garbage collector is paused until collection ends, then everything alive is frozen out of its reach
# (`pytest_collection`), as after a command's heavy imports (nearid.cli.collector_paused): it would walk them again
# at each full collection, seconds of each worker's time. Collection's own garbage (import cycles) is frozen with
# them: collecting it first would cost as much as the collections saved.
gc.disable()

# OpenMP threads that wait for work sleep instead of spinning. Spinning threads hold the cores they wait on: with
# the other pytest-xdist worker or other work on the machine, the thread they wait for gets no core, and a test
# took up to 8 times longer (docs/development.md). The arithmetic is the same. Read when OpenMP starts, so set
# before torch is imported (tests.helpers imports it), and inherited by the interpreters the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from tests.helpers import (
    REPO_ROOT,
    assert_finished,
    corrupt_image,
    draw_vector,
    export_with_card,
    launch,
    make_tiny_nearid,
    make_tiny_processor,
    make_tiny_siglip,
    present,
    random_pixels,
    reset_accelerator_state,
    rewrite,
    run_isolated_checks,
    unchanged,
)

# The test files that share one costly session fixture: pytest-xdist gives each group to one worker.
DEMO_RUN_FILES = ("tests/test_demo.py", "tests/test_readme.py")
REMOTE_CODE_CHECK_FILES = ("tests/test_remote_code.py", "tests/test_hub.py", "tests/test_image_processing.py")
TWO_PROCESS_LAUNCH_FILES = ("tests/test_train_multiprocess.py", "tests/test_evaluate_multiprocess.py")
SHARED_FIXTURE_GROUPS = {"demo_run": DEMO_RUN_FILES, "remote_code_checks": REMOTE_CODE_CHECK_FILES,
                         "two_process_launch": TWO_PROCESS_LAUNCH_FILES}
# The files that take longest (`pytest --durations`), started first so that no worker is left with one at the end.
SLOWEST_FILES = (*DEMO_RUN_FILES, *TWO_PROCESS_LAUNCH_FILES, "tests/test_benchmarks.py", "tests/test_app_browser.py",
                 "tests/test_input_path.py")


def pytest_configure(config):
    """torch runs the tests on one thread: their models are tiny, and the other pytest-xdist worker has the other
    core. The demo sets its own thread count (`demo.DEMO_THREADS`), as `make demo` runs it: the README shows that
    run's numbers, and they depend on the thread count."""
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    """What collection made frozen and the garbage collector back on (see the gc.disable() above); the heavy
    imports of the tests' own command runs frozen too, as in the commands' processes."""
    try:
        return (yield)
    finally:
        from nearid.cli import freeze_heavy_imports

        gc.freeze()
        gc.enable()
        freeze_heavy_imports()


def pytest_collection_modifyitems(items):
    """SLOWEST_FILES first (a stable sort: the order within a file is kept)."""
    def rank(item):
        path = item.nodeid.split("::", 1)[0]
        return SLOWEST_FILES.index(path) if path in SLOWEST_FILES else len(SLOWEST_FILES)

    items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist (`make test`) gives each worker whole test files, in the order collected, so that a module
    fixture is built once, and the files of each SHARED_FIXTURE_GROUPS fixture together."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # not by number of tests: the slowest files first

    class OneFilePerWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            return next((group for group, files in SHARED_FIXTURE_GROUPS.items() if path in files), path)

    return OneFilePerWorker(config, log)


@pytest.fixture
def tiny_siglip():
    return make_tiny_siglip()


@pytest.fixture
def tiny_nearid():
    return make_tiny_nearid()


@pytest.fixture
def pixels():
    return random_pixels()


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A small synthetic benchmark (nearid_synthetic) with some distractors missing."""
    import nearid.commands.synthetic

    root = tmp_path_factory.mktemp("synthetic")
    nearid.commands.synthetic.main(["--output-dir", str(root), "--num-identities", "10",
                                    "--missing-distractor-rate", "0.2"])
    with unchanged(root):
        yield root


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory):
    """A tiny random NearID exported as a complete Hub repo folder."""
    from nearid.hub import export_hub_folder

    folder = tmp_path_factory.mktemp("model") / "repo"
    with unchanged(export_hub_folder(make_tiny_nearid(), make_tiny_processor(), folder)) as repo:
        yield repo


@pytest.fixture(scope="session")
def train_synthetic(tmp_path_factory):
    """Synthetic training data: 16 identities, two sources with missing distractors, MTG."""
    import nearid.commands.synthetic

    root = tmp_path_factory.mktemp("synthetic")
    nearid.commands.synthetic.main(["--output-dir", str(root), "--num-identities", "16", "--image-size", "48",
                                    "--missing-distractor-rate", "0.2", "--mtg-train", "4", "--mtg-test", "2"])
    with unchanged(root):
        yield root


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    """A tiny SigLIP checkpoint folder with a SigLIP-style preprocessor config, like a Hub snapshot."""
    from nearid.models import save_siglip_checkpoint

    folder = tmp_path_factory.mktemp("base") / "tiny-siglip"
    with unchanged(save_siglip_checkpoint(folder, model=make_tiny_siglip())) as checkpoint:
        yield checkpoint


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One run of the main job as `make demo` runs it (default sizes), shared by the tests that read its
    outputs: the folder it wrote (named demo_outputs, as the README's commands expect), its result and
    what it printed."""
    import contextlib
    import io

    from nearid.commands import demo

    output_dir = tmp_path_factory.mktemp("demo") / "demo_outputs"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = demo.main(["--output-dir", str(output_dir)])
    return {"output_dir": output_dir, "result": result, "printed": printed.getvalue()}


@pytest.fixture(scope="session")
def remote_code_checks(tmp_path_factory):
    """The loads a Hub user runs (tests/remote_code_checks.py), all in one fresh interpreter with an empty
    remote-code cache and the Hub offline: {check name: IsolatedCheck}."""
    from tests.remote_code_checks import prepare_checks

    root = tmp_path_factory.mktemp("remote_code_checks")
    return run_isolated_checks(prepare_checks(root), root)


@pytest.fixture(scope="session")
def commands_data(synthetic, tiny_repo, train_synthetic, base_model, tmp_path_factory):
    """What tests/commands_worker.py's runs read: `synthetic`, a copy of its `sdxl` source with one image
    corrupt, `tiny_repo` and a gallery of 11 images for the evaluate and search runs, `train_synthetic` and
    `base_model` for the train run; the error that stops the last run; and "worker_args", the worker's
    arguments but its output folder: {"benchmark", "sdxl_broken", "model", "broken_row", "gallery",
    "stop_message", "worker_args"}."""
    import datasets
    import numpy as np

    root = tmp_path_factory.mktemp("commands_data")
    sdxl = datasets.load_from_disk(str(synthetic / "sdxl"))
    with_image = [row for row, ok in enumerate(present(sdxl, "nimg1")) if ok]
    broken_row = with_image[len(with_image) // 2]
    rewrite(synthetic / "sdxl", root / "sdxl_broken", lambda dataset: corrupt_image(dataset, broken_row, "nimg1"))
    gallery = root / "gallery"
    gallery.mkdir()
    rng = np.random.default_rng(0)
    for number in range(11):
        draw_vector(rng.uniform(-1, 1, 3 * 8 * 8), side=8).save(gallery / f"image{number:02d}.png")
    return {"benchmark": synthetic, "sdxl_broken": root / "sdxl_broken", "model": tiny_repo,
            "broken_row": broken_row, "gallery": gallery,
            "stop_message": f"error: Could not decode source sdxl row {broken_row} column nimg1",
            "worker_args": [train_synthetic, base_model, tiny_repo, synthetic, root / "sdxl_broken", gallery]}


@pytest.fixture(scope="session")
def two_process_launch(commands_data, tmp_path_factory):
    """tests/commands_worker.py's runs on two processes, in one launch (4 to 5 CPU-seconds of imports per
    process, and torchrun's, paid once): the output folder ("out": train/, nearid/, index/, retrieval/, ...),
    the launcher's output and exit code ("output", "code"). TWO_PROCESS_LAUNCH_FILES read it.

    The last run stops each process on purpose, so the launch fails: each of the others is judged complete by
    the runs each process recorded as returned and by the files they write, then by the exit status each
    process stopped with (`helpers.assert_finished`)."""
    from tests import commands_worker

    root = tmp_path_factory.mktemp("two_process_launch")
    out = root / "out"
    # Five runs in one launch: more time than the one run of a launch of its own had.
    code, output = launch(2, [REPO_ROOT / "tests" / "commands_worker.py", *commands_data["worker_args"], out], root,
                          "out.log", timeout=600)
    returned = ["train", "nearid", "index", "retrieval"]
    assert_finished(code, output, all(commands_worker.completed(out, rank) == returned for rank in (0, 1))
                    and all((out / path).is_file() for path in
                            ("train/train_results.json", "nearid/nearid_results.json", "index/search_index.json",
                             "retrieval/retrieval_results.json"))
                    and output.count(commands_data["stop_message"]) == 2, exit_status=1)
    # No remote-code module cache to fill first: the tools build the model with this checkout's classes.
    assert not list((root / "hf_modules").rglob("*.py"))
    return {"out": out, "output": output, "code": code}


@pytest.fixture
def hub():
    """huggingface_hub talking to a fake Hub (tests/fake_hub.py) instead of the network."""
    from tests.fake_hub import use_fake_hub

    with use_fake_hub() as fake:
        yield fake


@pytest.fixture
def repo(tmp_path):
    """A tiny random NearID exported with its model card (tests/helpers.py `card_kwargs`)."""
    return export_with_card(tmp_path / "nearid-test")


@pytest.fixture
def isolated_cache(tmp_path_factory, monkeypatch):
    """Parquet and Hub loads write an Arrow cache; keep it out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_cache")


@pytest.fixture(scope="session")
def embed(tiny_repo):
    """An image (PIL image or file) -> its normalised embedding, one image per forward, through the model's
    public API."""
    import torch

    from image_processing_nearid import NearIDImageProcessor
    from modeling_nearid import NearIDModel

    model = NearIDModel.from_pretrained(tiny_repo, dtype=torch.float32).eval()
    processor = NearIDImageProcessor.from_pretrained(tiny_repo)

    def run(image):
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return model.get_image_features(pixels, normalize=True)[0].double().numpy()

    return run


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state (AcceleratorState, PartialState), fixed by the first
    Accelerator, its mixed precision included: every in-process `train.main` sets it. Reset it before each
    test (a module or session fixture may have trained) and after it, so that no test inherits another's."""
    reset_accelerator_state()
    yield
    reset_accelerator_state()
