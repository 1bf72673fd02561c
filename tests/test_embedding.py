"""Scorers and the embedding cache: right embeddings, each image embedded once, zero forwards on a rerun."""

import io

import numpy as np
import pytest
import torch
from tests.helpers import make_tiny_nearid, make_tiny_processor, make_tiny_siglip
from PIL import Image

from nearid.embedding import EmbeddingCache, embed_missing, embedding_matrix
from nearid.hub import export_hub_folder
from nearid.scorers import Scorer, parse_spec


def png_bytes(color, size=(40, 36)):
    buffer = io.BytesIO()
    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], color[1], 90), (4, 4, 20, 18))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode(ref):
    try:
        return Image.open(io.BytesIO(ref)).convert("RGB")
    except OSError as error:
        raise ValueError(f"cannot decode test image: {error}") from error


@pytest.fixture(scope="module")
def nearid_scorer(tmp_path_factory):
    folder = export_hub_folder(make_tiny_nearid(), make_tiny_processor(), tmp_path_factory.mktemp("m") / "repo")
    return Scorer(f"nearid:{folder}")


@pytest.fixture
def refs():
    return {f"h{i}": png_bytes((30 * i, 200 - 20 * i, 60)) for i in range(5)}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("clip:openai/clip-vit-large-patch14", ("clip", "openai/clip-vit-large-patch14")),
        ("siglip-mean:google/siglip2-so400m-patch14-384", ("siglip-mean", "google/siglip2-so400m-patch14-384")),
        ("Aleksandar/nearid-siglip2", ("nearid", "Aleksandar/nearid-siglip2")),
        ("/models/nearid", ("nearid", "/models/nearid")),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


def test_parse_spec_rejects_unknown_kind():
    with pytest.raises(ValueError, match="Unknown scorer kind 'vitx'.*clip"):
        parse_spec("vitx:some/model")


def test_nearid_scorer_matches_the_model(nearid_scorer, refs):
    images = [decode(r) for r in refs.values()]
    pixels = torch.stack([nearid_scorer.preprocess(i) for i in images])
    expected = nearid_scorer.model.get_image_features(pixels)
    torch.testing.assert_close(nearid_scorer.embed(pixels), expected, atol=1e-6, rtol=0)
    assert nearid_scorer.provenance()["kind"] == "nearid" and len(nearid_scorer.fingerprint) == 32


@pytest.mark.parametrize("kind", ["siglip", "siglip-mean"])
def test_siglip_baselines(tmp_path, kind, refs):
    from transformers import SiglipImageProcessorPil

    siglip = make_tiny_siglip()
    siglip.save_pretrained(tmp_path)
    SiglipImageProcessorPil(size={"height": 30, "width": 30}).save_pretrained(tmp_path)
    scorer = Scorer(f"{kind}:{tmp_path}")
    pixels = torch.stack([scorer.preprocess(decode(r)) for r in refs.values()])
    with torch.no_grad():
        output = siglip(pixel_values=pixels)
    raw = output.pooler_output if kind == "siglip" else output.last_hidden_state.mean(1)
    torch.testing.assert_close(scorer.embed(pixels), torch.nn.functional.normalize(raw, dim=-1), atol=1e-6, rtol=0)


def test_second_run_does_zero_forwards(nearid_scorer, refs, tmp_path):
    first = EmbeddingCache(tmp_path, nearid_scorer.fingerprint)
    before = nearid_scorer.images_embedded
    embed_missing(nearid_scorer, refs, first, decode, batch_size=2, progress=False)
    assert nearid_scorer.images_embedded - before == len(refs)

    passes = nearid_scorer.forward_passes
    second = EmbeddingCache(tmp_path, nearid_scorer.fingerprint)  # a new run reads the shards
    assert len(second) == len(refs)
    embed_missing(nearid_scorer, refs, second, decode, progress=False)
    assert nearid_scorer.forward_passes == passes
    for key in refs:
        np.testing.assert_array_equal(second.get(key), first.get(key))


def test_only_missing_images_are_embedded(nearid_scorer, refs, tmp_path):
    cache = EmbeddingCache(tmp_path, nearid_scorer.fingerprint)
    embed_missing(nearid_scorer, dict(list(refs.items())[:2]), cache, decode, progress=False)
    before = nearid_scorer.images_embedded
    embed_missing(nearid_scorer, refs, cache, decode, progress=False)
    assert nearid_scorer.images_embedded - before == len(refs) - 2


def test_corrupt_image_raises_or_is_skipped(nearid_scorer, refs, tmp_path):
    refs = {**refs, "bad": b"not an image"}
    with pytest.raises(ValueError, match="cannot decode"):
        embed_missing(nearid_scorer, refs, EmbeddingCache(None, "x"), decode, progress=False)
    cache = EmbeddingCache(None, "x")
    skipped = embed_missing(nearid_scorer, refs, cache, decode, skip_errors=True, progress=False)
    assert list(skipped) == ["bad"] and "cannot decode" in skipped["bad"]
    matrix, present = embedding_matrix(cache, ["h0", None, "bad", "h1"], dim=32)
    assert present.tolist() == [True, False, False, True]
    assert np.all(matrix[1] == 0) and np.allclose(np.linalg.norm(matrix[[0, 3]], axis=1), 1, atol=1e-5)


def test_non_finite_embeddings_are_an_error(nearid_scorer):
    with torch.no_grad():
        probe = nearid_scorer.model.backbone.vision_model.head.probe
        saved = probe.clone()
        probe.fill_(float("nan"))
    try:
        with pytest.raises(FloatingPointError, match="non-finite"):
            nearid_scorer.embed(torch.zeros(1, 3, 30, 30))
    finally:
        with torch.no_grad():
            probe.copy_(saved)
