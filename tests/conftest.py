"""Shared fixtures: tiny random SigLIP towers, NearID models built from them, Hub-style folders."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# The numbers transformers' own SigLIP tests use: small enough for milliseconds on a CPU.
TINY_VISION = dict(
    image_size=30,
    patch_size=2,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
)


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


def make_tiny_processor(resample=2):
    from image_processing_nearid import NearIDImageProcessor

    size = TINY_VISION["image_size"]
    return NearIDImageProcessor(size={"height": size, "width": size}, resample=resample)


def random_pixels(batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    size = TINY_VISION["image_size"]
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def run_isolated(code, tmp_path, extra_env=None, timeout=300):
    """Run python `code` in a fresh interpreter with an empty remote-code cache and the Hub offline.

    This is how a user meets the repo: transformers copies the remote code into HF_MODULES_CACHE
    and imports it from there, never from this checkout.
    """
    env = dict(os.environ)  # PYTHONPATH may select the transformers under test; the checkout is not on it
    env.update(
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
    import nearid_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    nearid_synthetic.main(["--output-dir", str(root), "--num-identities", "10", "--missing-distractor-rate", "0.2"])
    return root


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    """A tiny random NearID exported as a complete Hub repo folder."""
    from nearid_hub import export_hub_folder

    return export_hub_folder(make_tiny_nearid(), make_tiny_processor(), tmp_path_factory.mktemp("model") / "repo")


@pytest.fixture(scope="module")
def train_synthetic(tmp_path_factory):
    """Synthetic training data: 16 identities, two sources with missing distractors, MTG."""
    import nearid_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    nearid_synthetic.main(["--output-dir", str(root), "--num-identities", "16", "--image-size", "48",
                           "--missing-distractor-rate", "0.2", "--mtg-train", "4", "--mtg-test", "2"])
    return root


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny SigLIP checkpoint folder with a SigLIP-style preprocessor config, like a Hub snapshot."""
    import nearid_synthetic

    return nearid_synthetic.save_siglip_checkpoint(tmp_path_factory.mktemp("base") / "tiny-siglip", model=make_tiny_siglip())


@pytest.fixture
def hub():
    """huggingface_hub talking to a fake Hub (tests/fake_hub.py) instead of the network."""
    from fake_hub import use_fake_hub

    with use_fake_hub() as fake:
        yield fake

