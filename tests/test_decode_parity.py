"""One decode for every entry point: the same file gives bit-identical pixels (hence embeddings and tokens)
through the image processor, `evaluate.py score`, `evaluate.py nearid` reading it as dataset bytes, and
the training token cache.

Each entry point's stored value is compared with the model run on the processor's `pixel_values` for
the file path, one image per forward pass (batch size 1 everywhere, so no batch-dependent rounding
can hide or fake a difference).
"""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from nearid.commands import evaluate
from image_processing_nearid import NearIDImageProcessor
from modeling_nearid import NearIDModel
from nearid.images import content_hash
from nearid.store.embedding_store import EmbeddingStore
from nearid.store.fill import FillOptions, fill
from nearid.store.image_index import ImageIndex
from nearid.tokens import BackboneTokens
from tests.helpers import noise


def exif_jpeg(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(noise(24, 40, 3, 1)).save(path, exif=exif, quality=95)


def palette_with_transparency(path):
    image = Image.fromarray(noise(30, 50, 3, 2)).convert("P")
    image.info["transparency"] = 7
    image.save(path)


KINDS = {
    "exif.jpg": exif_jpeg,
    "rgba.png": lambda path: Image.fromarray(noise(30, 50, 4, 3)).save(path),
    "p_transparency.png": palette_with_transparency,
    "la.png": lambda path: Image.fromarray(noise(30, 50, 4, 4)).convert("LA").save(path),
    "i16.png": lambda path: Image.fromarray(
        np.random.default_rng(5).integers(0, 65536, (30, 50), dtype=np.uint16)).save(path),
    "cmyk.jpg": lambda path: Image.fromarray(noise(30, 50, 3, 6)).convert("CMYK").save(path, quality=95),
}


@pytest.fixture(scope="module")
def model(tiny_repo):
    return NearIDModel.from_pretrained(tiny_repo, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(tiny_repo):
    return NearIDImageProcessor.from_pretrained(tiny_repo)


@pytest.mark.parametrize("name", list(KINDS))
def test_the_same_file_gives_the_same_pixels_through_every_entry_point(name, tiny_repo, model, processor, tmp_path):
    folder = tmp_path / "samples"
    for side in ("src_image", "tgt_image"):
        (folder / side).mkdir(parents=True)
        KINDS[name](folder / side / name)
    path = folder / "tgt_image" / name
    key = content_hash({"bytes": None, "path": str(path)})
    pixels = processor(path)["pixel_values"]  # 1. the processor given the path
    with torch.no_grad():
        expected_embedding = model.get_image_features(pixels)[0]
        expected_tokens = model.forward_features(pixels)[0]

    # 2. evaluate.py score: the embedding it stores for the file
    common = ["--model", str(tiny_repo), "--batch-size", "1", "--device", "cpu"]
    evaluate.main(["score", *common, "--samples", str(folder), "--cache-dir", str(tmp_path / "score_cache"),
                   "--output-dir", str(tmp_path / "score")])
    assert torch.equal(stored(tmp_path / "score_cache", key), expected_embedding)

    # 3. evaluate.py nearid: the same file as encoded bytes in a dataset column
    data = tmp_path / "data"
    bytes_column = {"bytes": path.read_bytes(), "path": None}
    features = datasets.Features({"id": datasets.Value("string"), **{f"img{k}": datasets.Image() for k in (1, 2, 3)}})
    datasets.Dataset.from_dict({"id": ["a"], "img1": [bytes_column], "img2": [bytes_column], "img3": [None]},
                               features=features).save_to_disk(str(data / "positives"))
    features = datasets.Features({"id": datasets.Value("string"), **{f"nimg{k}": datasets.Image() for k in (1, 2, 3)}})
    datasets.Dataset.from_dict({"id": ["a"], "nimg1": [bytes_column], "nimg2": [None], "nimg3": [None]},
                               features=features).save_to_disk(str(data / "flux"))
    evaluate.main(["nearid", *common, "--positives", str(data / "positives"), "--source", f"flux={data / 'flux'}",
                   "--cache-dir", str(tmp_path / "nearid_cache"), "--output-dir", str(tmp_path / "nearid")])
    assert torch.equal(stored(tmp_path / "nearid_cache", key), expected_embedding)

    # 4. the training token cache, filled from a dataset column as train.py fills it
    index = ImageIndex()
    index.add_column("positives", datasets.load_from_disk(str(data / "positives")), "img1")
    encoder = BackboneTokens(model, processor, storage_dtype="float32")
    store, _ = fill(tmp_path / "tokens", encoder.fingerprint, encoder.format, index, encoder.loader, encoder,
                    FillOptions(batch_size=1, progress=False))
    assert torch.equal(store.get([key])[0], expected_tokens)


def stored(cache_dir, key):
    [fingerprint] = [p.name for p in cache_dir.iterdir() if p.is_dir()]  # the one store the run filled
    return EmbeddingStore.open(cache_dir, fingerprint).get([key])[0]
