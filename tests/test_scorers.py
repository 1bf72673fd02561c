"""Scorers: right embeddings through the store (once per image, ever), whose code is trusted, and
what a wrong model argument says."""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from nearid.evaluation.protocol import embed_images
from nearid.images import ImageLoadError
from nearid.loading import resolve_model_folder
from nearid.numerics import resolve_device
from nearid.scorers import Scorer, parse_spec, pinned_spec
from nearid.store.fill import FillOptions
from nearid.store.image_index import ImageIndex
from tests.helpers import make_hostile, make_tiny_siglip, markers_written, random_pixels


def png(path, color, size=(40, 36)):
    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], color[1], 90), (4, 4, 20, 18))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def nearid_scorer(tiny_repo):
    return Scorer(f"nearid:{tiny_repo}")


@pytest.fixture
def files(tmp_path):
    return [png(tmp_path / f"img{i}.png", (30 * i, 200 - 20 * i, 60)) for i in range(5)]


def index_of(paths, skip_errors=False):
    index = ImageIndex(skip_errors)
    index.add_files(paths)
    return index


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("clip:openai/clip-vit-large-patch14", ("clip", "openai/clip-vit-large-patch14")),
        ("siglip-mean:google/siglip2-so400m-patch14-384", ("siglip-mean", "google/siglip2-so400m-patch14-384")),
        ("dinov3:facebook/dinov3-vitl16-pretrain-lvd1689m", ("dinov3", "facebook/dinov3-vitl16-pretrain-lvd1689m")),
        ("Aleksandar/nearid-siglip2", ("nearid", "Aleksandar/nearid-siglip2")),
        ("/models/nearid", ("nearid", "/models/nearid")),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


def test_parse_spec_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown scorer kind 'vitx'.*clip"):
        parse_spec("vitx:some/model")


def test_nearid_scorer_matches_the_model(nearid_scorer, files):
    pixels = torch.stack([nearid_scorer.preprocess(path) for path in files])
    expected = nearid_scorer.model.get_image_features(pixels)
    torch.testing.assert_close(nearid_scorer.encode(pixels), expected, atol=1e-6, rtol=0)
    provenance = nearid_scorer.provenance()
    assert provenance["kind"] == "nearid" and provenance["device"] == "cpu" and len(nearid_scorer.fingerprint) == 32


@pytest.mark.parametrize("kind", ["siglip", "siglip-mean"])
def test_siglip_baselines(tmp_path, kind, files):
    from transformers import SiglipImageProcessorPil

    siglip = make_tiny_siglip()
    siglip.save_pretrained(tmp_path / "siglip")
    SiglipImageProcessorPil(size={"height": 30, "width": 30}).save_pretrained(tmp_path / "siglip")
    scorer = Scorer(f"{kind}:{tmp_path / 'siglip'}")
    pixels = torch.stack([scorer.preprocess(path) for path in files])
    with torch.no_grad():
        output = siglip(pixel_values=pixels)
    raw = output.pooler_output if kind == "siglip" else output.last_hidden_state.mean(1)
    torch.testing.assert_close(scorer.encode(pixels), torch.nn.functional.normalize(raw, dim=-1), atol=1e-6, rtol=0)
    assert scorer.format.shape == (raw.shape[1],)


def test_a_second_run_embeds_nothing_and_reads_the_same_vectors(nearid_scorer, files, tmp_path):
    options = FillOptions(batch_size=2, progress=False)
    first = embed_images(nearid_scorer, index_of(files), tmp_path, options)
    assert first.stats == {"unique_images": 5, "images_embedded": 5, "forward_passes": 3}
    second = embed_images(nearid_scorer, index_of(files), tmp_path, options)
    assert second.stats["images_embedded"] == 0 and second.stats["forward_passes"] == 0
    np.testing.assert_array_equal(second.vectors.matrix, first.vectors.matrix)
    third = embed_images(nearid_scorer, index_of(files + [png(tmp_path / "new.png", (1, 2, 3))]), tmp_path, options)
    assert third.stats["images_embedded"] == 1


def test_an_unreadable_image_stops_or_is_skipped_and_listed(nearid_scorer, files, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths = files + [tmp_path / "bad.png", tmp_path / "missing.png"]
    with pytest.raises(ImageLoadError, match="missing.png"):
        embed_images(nearid_scorer, index_of(paths), tmp_path / "cache", FillOptions(progress=False))
    with pytest.raises(ImageLoadError, match="bad.png"):
        embed_images(nearid_scorer, index_of(paths[:-1]), tmp_path / "cache", FillOptions(progress=False))
    embedded = embed_images(nearid_scorer, index_of(paths, skip_errors=True), tmp_path / "cache",
                            FillOptions(progress=False, skip_errors=True))
    assert sorted(s["image"] for s in embedded.skipped) == [f"image file {str(tmp_path / 'bad.png')!r}",
                                                             f"image file {str(tmp_path / 'missing.png')!r}"]
    assert len(embedded.vectors) == len(files)


def test_non_finite_embeddings_are_an_error(tiny_repo, tmp_path):
    scorer = Scorer(str(tiny_repo))
    with torch.no_grad():
        scorer.model.backbone.vision_model.head.probe.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        scorer.encode(torch.zeros(1, 3, 30, 30))


# --------------------------------------------------------------------------------------------------
# Whose code runs


def test_a_nearid_config_gets_this_checkouts_code_not_the_folders(tiny_repo, tmp_path, caplog):
    hostile, markers = make_hostile(tiny_repo, tmp_path)
    scorer = Scorer(str(hostile))
    assert "ships configuration_nearid.py, image_processing_nearid.py, modeling_nearid.py" in caplog.text
    assert markers_written(markers) == []  # neither its files nor the auto_map's outside folder were imported
    assert type(scorer.model).__module__ == "modeling_nearid" and type(scorer.processor).__module__ == "image_processing_nearid"
    pixels = random_pixels()
    torch.testing.assert_close(scorer.encode(pixels), Scorer(str(tiny_repo)).encode(pixels), rtol=0, atol=0)


def test_code_that_differs_is_named_once_per_model(tiny_repo, tmp_path, caplog):
    changed = tmp_path / "changed"
    shutil.copytree(tiny_repo, changed)
    with open(changed / "modeling_nearid.py", "a") as code:
        code.write("# edited\n")
    Scorer(str(changed))
    Scorer(str(changed))
    Scorer(str(tiny_repo))  # the checkout's own files: nothing to say
    messages = [r.getMessage() for r in caplog.records if "differ from this NearID checkout" in r.getMessage()]
    assert len(messages) == 1 and f"{changed} ships modeling_nearid.py, which differ" in messages[0]


def test_another_model_type_is_refused_on_its_config_alone(tiny_repo, tmp_path):
    foreign, markers = make_hostile(tiny_repo, tmp_path)
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "model_type": "evil"}))
    with pytest.raises(ValueError, match="not a NearID model.*model_type 'evil'.*KIND:MODEL") as error:
        Scorer(str(foreign))
    assert "trust-remote-code" not in str(error.value)
    assert markers_written(markers) == []


def test_a_siglip_folder_given_as_nearid_is_pointed_to_the_siglip_baseline(base_model):
    with pytest.raises(ValueError, match=f"is a SigLIP model.*give it as a baseline: siglip:{base_model}$"):
        Scorer(str(base_model))
    assert Scorer(f"siglip:{base_model}").kind_name == "siglip"


def test_a_baseline_without_safetensors_weights_is_refused(base_model, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(base_model, pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        Scorer(f"siglip:{pickled}")


def test_a_config_without_auto_map_loads(tiny_repo, tmp_path):
    plain = tmp_path / "no_auto_map"
    shutil.copytree(tiny_repo, plain)
    config = json.loads((plain / "config.json").read_text())
    config.pop("auto_map")
    (plain / "config.json").write_text(json.dumps(config))
    pixels = random_pixels()
    torch.testing.assert_close(Scorer(str(plain)).encode(pixels), Scorer(str(tiny_repo)).encode(pixels), rtol=0, atol=0)


def test_a_wrong_local_path_says_no_such_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for typo in ("./models/neard", str(tmp_path / "nope"), "~/not-here"):
        with pytest.raises(FileNotFoundError, match="no such folder"):
            resolve_model_folder(typo)


def test_an_unreachable_hub_names_offline_mode_and_local_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="Hub is not reachable.*HF_HUB_OFFLINE.*local folder"):
        resolve_model_folder("someone/nearid-not-cached")


def test_a_hub_id_records_the_commit_it_resolved_to(tiny_repo, tmp_path, monkeypatch):
    # A Hub download lives in the cache as snapshots/<commit>, with refs/<branch> naming the commit:
    # the same layout, built by hand, is read offline by the real download code.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--nearid"
    shutil.copytree(tiny_repo, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    scorer = Scorer("someone/nearid")
    assert scorer.provenance()["commit"] == commit and scorer.provenance()["revision"] is None
    assert Scorer("someone/nearid", revision="main").provenance()["commit"] == commit


def test_a_scorer_pins_a_hub_revision_as_model_at_rev_like_its_revision_flag(tiny_repo, hub, tmp_path,
                                                                             monkeypatch):
    first, second = "a" * 40, "b" * 40
    hub.serve("someone/nearid", tiny_repo, first)
    hub.serve("someone/nearid", tiny_repo, second)  # main moves on
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    pinned = Scorer(f"nearid:someone/nearid@{first}").provenance()
    assert (pinned["model"], pinned["revision"], pinned["commit"]) == ("someone/nearid", first, first)
    assert Scorer("someone/nearid", revision=first).provenance()["commit"] == first
    assert Scorer("someone/nearid").provenance()["commit"] == second
    assert pinned_spec(pinned) == ("nearid:someone/nearid", first)  # loads it again, at that commit
    with pytest.raises(ValueError, match=f"pins the revision '{first}', and the revision flag gives 'main'"):
        Scorer(f"someone/nearid@{first}", revision="main")


def test_a_revision_for_a_local_folder_is_ignored_as_transformers_does(tiny_repo):
    # from_pretrained(folder, revision="main") loads the folder; the quick start's call must too.
    assert resolve_model_folder(str(tiny_repo), revision="main") == (tiny_repo, None)
    scorer = Scorer(str(tiny_repo), revision="v1")
    assert scorer.provenance()["revision"] is None and scorer.provenance()["path"] == str(tiny_repo.resolve())


def test_an_unavailable_device_is_an_error():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda is not available"):
            resolve_device("cuda")


def test_bytes_of_an_image_decode_like_its_file(nearid_scorer, files):
    data = files[0].read_bytes()
    torch.testing.assert_close(nearid_scorer.preprocess(data), nearid_scorer.preprocess(files[0]), rtol=0, atol=0)
    torch.testing.assert_close(nearid_scorer.preprocess(Image.open(io.BytesIO(data))),
                               nearid_scorer.preprocess(files[0]), rtol=0, atol=0)
