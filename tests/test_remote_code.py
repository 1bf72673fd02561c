"""The repo as users meet it: a Hub-style folder loaded through the Auto classes and the pipeline.

The loads run in a fresh interpreter with an empty HF_MODULES_CACHE and HF_HUB_OFFLINE=1, so the
remote code is the copy in the folder, imported the way transformers imports it from the Hub: one
interpreter for the session's remote-code checks (`remote_code_checks`, tests/remote_code_checks.py).
"""

import ast
import json
import os
import sys

import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open

from nearid.hub import export_hub_folder
from nearid.resources import REMOTE_CODE_FILES
from tests.helpers import REPO_ROOT, TINY_VISION, make_tiny_nearid, make_tiny_processor, rounded_tiny_nearid


@pytest.fixture
def hub_repo(tmp_path):
    """A complete repo folder (fp16 weights) and the fp32 model its weights round to."""
    folder = export_hub_folder(make_tiny_nearid(), make_tiny_processor(), tmp_path / "repo")
    return folder, rounded_tiny_nearid()


# What the remote code may import: every import becomes a requirement of every Hub user.
ALLOWED_IMPORTS = {"torch", "transformers", "PIL", "numpy", *(name.removesuffix(".py") for name in REMOTE_CODE_FILES)}


@pytest.mark.parametrize("name", REMOTE_CODE_FILES)
def test_remote_code_imports_only_torch_transformers_pil_numpy_and_the_standard_library(name):
    tree = ast.parse((REPO_ROOT / name).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):  # a relative import: one of the other remote-code files
            assert node.module in ALLOWED_IMPORTS, (name, node.module)
    outside = sorted(imported - ALLOWED_IMPORTS - set(sys.stdlib_module_names))
    assert not outside, f"{name} imports {outside}: Hub users would need them too"


def test_export_writes_exactly_the_files_a_hub_user_needs(hub_repo):
    folder, model = hub_repo
    names = {p.name for p in folder.iterdir()}
    assert names == {"config.json", "preprocessor_config.json", "model.safetensors", *REMOTE_CODE_FILES}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
    assert keys == set(model.state_dict()) and all(k.startswith("backbone.vision_model.") for k in keys)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_nearid.NearIDModel"
    processor_config = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor_config["auto_map"]["AutoImageProcessor"] == "image_processing_nearid.NearIDImageProcessor"


def test_export_refuses_to_overwrite_a_non_empty_folder(hub_repo):
    folder, model = hub_repo
    before = (folder / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_hub_folder(model, make_tiny_processor(), folder)
    assert (folder / "model.safetensors").read_bytes() == before


def test_remote_code_checks_run_on_the_transformers_under_test(remote_code_checks):
    """The fresh interpreter imports the transformers this process imported (PYTHONPATH selects the release under
    test, `make test-oldest-transformers`): a path it cannot resolve from its own working folder would load the
    venv's release instead, and the checks would pass without testing the one meant."""
    ran_on = {name: check.transformers for name, check in remote_code_checks.items()}
    assert ran_on == dict.fromkeys(remote_code_checks, transformers.__version__)
    # The Makefile names the release it meant: a PYTHONPATH that misses it for this process too is caught here.
    meant = os.environ.get("NEARID_TRANSFORMERS_UNDER_TEST")
    assert meant in (None, transformers.__version__), f"meant to test transformers {meant}, imported the venv's"


def test_auto_classes_load_the_remote_code(remote_code_checks):
    check = remote_code_checks["auto_classes"]
    result = json.loads(check.stdout.strip().splitlines()[-1])
    assert result["config"] == "NearIDConfig" and result["model"] == "NearIDModel"
    assert result["module"].startswith("transformers_modules.")  # the folder's copy, not this checkout
    assert result["module"] in check.imported  # imported by this check, not found imported by an earlier one
    assert result["processor"] == "NearIDImageProcessor" and result["size"]["height"] == TINY_VISION["image_size"]
    assert all(k.startswith("backbone.vision_model.") for k in result["keys"])
    with torch.no_grad():
        expected = rounded_tiny_nearid()(torch.load(check.folder / "pixels.pt")).image_embeds
    torch.testing.assert_close(torch.load(check.folder / "embeds.pt"), expected, atol=1e-5, rtol=1e-5)


def test_pipeline_pool_gives_the_raw_identity_embedding(remote_code_checks):
    check = remote_code_checks["pipeline"]
    tokens_shape = json.loads(check.stdout.strip().splitlines()[-1])["tokens"]
    assert check.imported_remote_code("modeling_nearid", "image_processing_nearid")  # the folder's copy, afresh
    patches = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2
    assert tokens_shape == [1, patches, TINY_VISION["hidden_size"]]
    pixels = make_tiny_processor()(Image.open(check.folder / "image.png"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = rounded_tiny_nearid()(pixels).pooler_output
    pooled = torch.load(check.folder / "pooled.pt").reshape(expected.shape)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled.norm(dim=-1), torch.ones(1))  # documented: not normalised
