"""What a Hub user runs against the repo's files, for the remote-code tests of test_remote_code.py, test_hub.py
and test_image_processing.py: the Auto classes, the pipeline, the card's quick start and AutoImageProcessor.

The checks run one after another in one fresh interpreter (`run_isolated_checks` in helpers.py), started once
for the session instead of once per check (a start costs seconds: torch and transformers' model machinery),
with HF_MODULES_CACHE empty at its start and HF_HUB_OFFLINE=1. Sharing it keeps each check what it was in an
interpreter of its own:
- each check loads its own folder, under a name no other check uses, so transformers copies that folder's
  remote code into a cache folder of its own and imports it from there afresh (each test asserts that its
  check imported the remote-code modules itself, rather than finding them imported by an earlier check);
- none of them changes state that another reads: no default dtype, thread count or environment variable.
What they do share is the third-party modules an earlier check imported (transformers' image utilities, PIL's
plugins): so the check that imports least runs first, the processor-only load, before any model code.
"""

import shutil

import torch
from PIL import Image

from nearid.hub import export_hub_folder
from tests.helpers import (
    REPO_ID,
    REPO_ROOT,
    export_with_card,
    make_tiny_nearid,
    make_tiny_processor,
    noise,
    random_pixels,
)

AUTO_CLASSES = """
import json, torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel
config = AutoConfig.from_pretrained({folder!r}, trust_remote_code=True)
model = AutoModel.from_pretrained({folder!r}, trust_remote_code=True, dtype=torch.float32).eval()
processor = AutoImageProcessor.from_pretrained({folder!r}, trust_remote_code=True)
with torch.no_grad():
    embeds = model(torch.load("pixels.pt")).image_embeds
torch.save(embeds, "embeds.pt")
print(json.dumps(dict(config=type(config).__name__, model=type(model).__name__, module=type(model).__module__,
                      processor=type(processor).__name__, size=processor.size, keys=list(model.state_dict())[:2])))
"""

PIPELINE = """
import json, torch
from transformers import pipeline
extractor = pipeline("image-feature-extraction", model={folder!r}, trust_remote_code=True,
                     model_kwargs={{"dtype": torch.float32}})
pooled = extractor("image.png", pool=True, return_tensors=True)
tokens = extractor("image.png", return_tensors=True)
torch.save(pooled, "pooled.pt")
print(json.dumps(dict(tokens=list(tokens.shape))))
"""

IMAGE_PROCESSOR = """
from transformers import AutoImageProcessor
processor = AutoImageProcessor.from_pretrained({folder!r}, trust_remote_code=True)
pixel_values = processor("image.png")["pixel_values"]
shape = "x".join(map(str, pixel_values.shape))
print(type(processor).__name__, type(processor).__module__, shape, repr(pixel_values.sum().item()))
"""


def prepare_checks(root):
    """Write each check's inputs into its working folder under `root` -> {name: (working folder, code)}."""
    checks = {}
    for name, prepare in (("image_processor", _image_processor), ("quick_start", _quick_start), ("pipeline", _pipeline),
                          ("auto_classes", _auto_classes)):
        folder = root / name
        folder.mkdir()
        checks[name] = (folder, prepare(folder))
    return checks


def hub_folder(folder):
    """A complete repo folder (fp16 weights) of the tiny model `make_tiny_nearid()`, named after its check."""
    return export_hub_folder(make_tiny_nearid(), make_tiny_processor(), folder / f"nearid-{folder.name}")


def _auto_classes(folder):
    torch.save(random_pixels(), folder / "pixels.pt")
    return AUTO_CLASSES.format(folder=str(hub_folder(folder)))


def _pipeline(folder):
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    image.paste((20, 200, 40), (5, 5, 30, 25))
    image.save(folder / "image.png")
    return PIPELINE.format(folder=str(hub_folder(folder)))


def _quick_start(folder):
    """The python block of the exported card's README, reading this folder's repo instead of the Hub's."""
    repo = export_with_card(folder / "nearid-quick-start")
    code = (repo / "README.md").read_text().split("```python\n")[1].split("```")[0]
    images = [Image.new("RGB", (40, 36), (200, 40, 40)), Image.new("RGB", (36, 40), (30, 160, 60))]
    images[1].paste((240, 240, 240), (4, 4, 20, 20))
    images[0].save(folder / "reference.jpg")
    images[1].save(folder / "generated.png")
    return code.replace(f'"{REPO_ID}"', repr(str(repo)))  # the same files, from the folder


def _image_processor(folder):
    """A folder with the image processor's remote code and config only."""
    repo = folder / "nearid-image-processor"
    repo.mkdir()
    for name in ("image_processing_nearid.py", "preprocessor_config.json"):
        shutil.copy(REPO_ROOT / name, repo / name)
    Image.fromarray(noise(30, 50, seed=23)).save(folder / "image.png")
    return IMAGE_PROCESSOR.format(folder=str(repo))
