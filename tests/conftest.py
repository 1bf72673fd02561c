"""Shared fixtures: tiny random SigLIP towers, NearID models built from them, Hub-style folders."""

import pytest

from tests.helpers import export_with_card, make_tiny_nearid, make_tiny_processor, make_tiny_siglip, random_pixels


@pytest.fixture
def tiny_siglip():
    return make_tiny_siglip()


@pytest.fixture
def tiny_nearid():
    return make_tiny_nearid()


@pytest.fixture
def pixels():
    return random_pixels()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A small synthetic benchmark (nearid_synthetic) with some distractors missing."""
    import nearid.synthetic

    root = tmp_path_factory.mktemp("synthetic")
    nearid.synthetic.main(["--output-dir", str(root), "--num-identities", "10", "--missing-distractor-rate", "0.2"])
    return root


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    """A tiny random NearID exported as a complete Hub repo folder."""
    from nearid.hub import export_hub_folder

    return export_hub_folder(make_tiny_nearid(), make_tiny_processor(), tmp_path_factory.mktemp("model") / "repo")


@pytest.fixture(scope="module")
def train_synthetic(tmp_path_factory):
    """Synthetic training data: 16 identities, two sources with missing distractors, MTG."""
    import nearid.synthetic

    root = tmp_path_factory.mktemp("synthetic")
    nearid.synthetic.main(["--output-dir", str(root), "--num-identities", "16", "--image-size", "48",
                           "--missing-distractor-rate", "0.2", "--mtg-train", "4", "--mtg-test", "2"])
    return root


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny SigLIP checkpoint folder with a SigLIP-style preprocessor config, like a Hub snapshot."""
    from nearid.models import save_siglip_checkpoint

    return save_siglip_checkpoint(tmp_path_factory.mktemp("base") / "tiny-siglip", model=make_tiny_siglip())


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
