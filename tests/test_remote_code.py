"""The repo as users meet it: a Hub-style folder loaded through the Auto classes and the pipeline.

Each load runs in a fresh interpreter with an empty HF_MODULES_CACHE and HF_HUB_OFFLINE=1, so the
remote code is the copy in the folder, imported the way transformers imports it from the Hub.
"""

import ast
import json
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from nearid.hub import export_hub_folder
from nearid.resources import REMOTE_CODE_FILES
from tests.helpers import REPO_ROOT, TINY_VISION, make_tiny_nearid, make_tiny_processor, random_pixels, run_isolated


@pytest.fixture
def hub_repo(tmp_path):
    """A complete repo folder (fp16 weights) and the fp32 model its weights round to."""
    model = make_tiny_nearid()
    folder = export_hub_folder(model, make_tiny_processor(), tmp_path / "repo")
    rounded = make_tiny_nearid()
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return folder, rounded.eval()


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


def test_auto_classes_load_the_remote_code(hub_repo, tmp_path):
    folder, model = hub_repo
    pixels = random_pixels()
    torch.save(pixels, tmp_path / "pixels.pt")
    out = run_isolated(
        f"""
import json, torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel
config = AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=True)
model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True, dtype=torch.float32).eval()
processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
with torch.no_grad():
    embeds = model(torch.load("pixels.pt")).image_embeds
torch.save(embeds, "embeds.pt")
print(json.dumps(dict(config=type(config).__name__, model=type(model).__name__, module=type(model).__module__,
                      processor=type(processor).__name__, size=processor.size, keys=list(model.state_dict())[:2])))
""",
        tmp_path,
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["config"] == "NearIDConfig" and result["model"] == "NearIDModel"
    assert result["module"].startswith("transformers_modules.")  # the folder's copy, not this checkout
    assert result["processor"] == "NearIDImageProcessor" and result["size"]["height"] == TINY_VISION["image_size"]
    assert all(k.startswith("backbone.vision_model.") for k in result["keys"])
    with torch.no_grad():
        expected = model(pixels).image_embeds
    torch.testing.assert_close(torch.load(tmp_path / "embeds.pt"), expected, atol=1e-5, rtol=1e-5)


def test_pipeline_pool_gives_the_raw_identity_embedding(hub_repo, tmp_path):
    folder, model = hub_repo
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    image.paste((20, 200, 40), (5, 5, 30, 25))
    image.save(tmp_path / "image.png")
    out = run_isolated(
        f"""
import json, torch
from transformers import pipeline
extractor = pipeline("image-feature-extraction", model={str(folder)!r}, trust_remote_code=True,
                     model_kwargs={{"dtype": torch.float32}})
pooled = extractor("image.png", pool=True, return_tensors=True)
tokens = extractor("image.png", return_tensors=True)
torch.save(pooled, "pooled.pt")
print(json.dumps(dict(tokens=list(tokens.shape))))
""",
        tmp_path,
    )
    tokens_shape = json.loads(out.strip().splitlines()[-1])["tokens"]
    patches = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2
    assert tokens_shape == [1, patches, TINY_VISION["hidden_size"]]
    pixels = make_tiny_processor()(Image.open(tmp_path / "image.png"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixels).pooler_output
    pooled = torch.load(tmp_path / "pooled.pt").reshape(expected.shape)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled.norm(dim=-1), torch.ones(1))  # documented: not normalised
