"""nearid.images: content keys (hashing never decodes), decoding with the image's location in errors,
the pixel loader of DataLoader workers, and finding image files."""

import hashlib
import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nearid.data.readers import image_ref, image_refs
from nearid.images import ImageLoadError, PixelLoader, content_hash, find_images, image_suffixes, load_image
from tests.helpers import make_tiny_processor


def png_bytes(color, size=(8, 8)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_dataset(images):
    return datasets.Dataset.from_dict({"img1": [{"bytes": b, "path": None} for b in images]},
                                      features=datasets.Features({"img1": datasets.Image()}))


@pytest.fixture(scope="module")
def positives(tmp_path_factory):
    return image_dataset([png_bytes("red"), png_bytes("green"), png_bytes("blue")])


def test_content_hash_stable_distinct_and_path_equals_bytes(positives, tmp_path):
    refs = image_refs(positives, "img1", [0, 1])
    assert content_hash(refs[0]) == content_hash(image_ref(positives, "img1", 0))
    assert content_hash(refs[0]) != content_hash(refs[1])
    assert content_hash(refs[0]) == hashlib.sha256(refs[0]["bytes"]).hexdigest()
    (tmp_path / "a.png").write_bytes(refs[0]["bytes"])
    by_path = {"bytes": None, "path": str(tmp_path / "a.png")}
    assert content_hash(by_path) == content_hash(refs[0])
    assert np.array_equal(np.asarray(load_image(by_path)), np.asarray(load_image(refs[0])))
    with pytest.raises(ValueError, match="row 3 column img2 is missing"):
        content_hash(None, "positives row 3 column img2")


def test_corrupt_images_hash_but_fail_to_decode_with_location(tmp_path):
    good = png_bytes("blue")
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy, "PNG")
    truncated = noisy.getvalue()[:-2000]
    Image.open(io.BytesIO(truncated))  # the header still parses: only decoding the pixels fails
    broken = image_dataset([good, b"garbage bytes", truncated])
    refs = image_refs(broken, "img1", [0, 1, 2])  # reading and hashing never decode
    assert content_hash(refs[1]) == hashlib.sha256(b"garbage bytes").hexdigest()
    assert load_image(refs[0], name="r0").size == (8, 8)
    for row in (1, 2):  # unidentifiable, and a truncated PNG that only fails on load()
        with pytest.raises(ImageLoadError, match=f"positives row {row} column img1"):
            load_image(refs[row], name=f"positives row {row} column img1")
    with pytest.raises(ImageLoadError, match="flux row 0 column nimg1: no such image file"):
        content_hash({"bytes": None, "path": str(tmp_path / "gone.png")}, "flux row 0 column nimg1")


def test_pixel_loader_decodes_then_preprocesses_and_pads_with_zeros(tmp_path):
    processor = make_tiny_processor()
    loader = PixelLoader(processor)
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes("red", (20, 12)))
    pixels = loader.pixels(({"bytes": None, "path": str(path)}, "a file"))
    torch.testing.assert_close(pixels, processor(str(path))["pixel_values"][0], rtol=0, atol=0)
    assert torch.equal(loader(None), torch.zeros(3, 30, 30))
    with pytest.raises(ImageLoadError, match="the corrupt one"):
        loader(({"bytes": b"junk", "path": None}, "the corrupt one"))


def photo_like(seed, size):
    """A JPEG of smooth gradients and noise: every code 0-255 occurs, as in photographs."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size[0] * size[1]).reshape(size[1], size[0], 1)
    pixels = (ramp + rng.normal(0, 40, (size[1], size[0], 3))).clip(0, 255).astype(np.uint8)
    stream = io.BytesIO()
    Image.fromarray(pixels).save(stream, format="JPEG")
    return stream.getvalue()


@pytest.mark.parametrize("settings", [{}, {"image_mean": [0.481, 0.458, 0.408], "image_std": [0.269, 0.261, 0.276],
                                           "resample": 3}])
def test_pixels_travel_as_uint8_and_are_normalised_to_the_processors_exact_values(settings):
    """Tolerance 0: the codes are the processor's resized uint8 pixels and the lookup uses its own table, so
    the pixels the model sees (and every stored embedding's fingerprint) are those of `processor(...)`."""
    from image_processing_nearid import NearIDImageProcessor

    processor = NearIDImageProcessor(size={"height": 48, "width": 40}, **settings)
    loader = PixelLoader(processor)
    images = [photo_like(seed, (64 + 8 * seed, 50)) for seed in range(4)]
    sent = [loader((image, f"image {i}")) for i, image in enumerate(images)]
    assert all(codes.dtype == torch.uint8 and codes.shape == (3, 48, 40) for codes in sent)  # 1 byte per value
    batch = loader.collate(sent)
    assert batch.dtype == torch.uint8
    expected = processor(images)["pixel_values"]
    torch.testing.assert_close(loader.model_input(batch), expected, rtol=0, atol=0)
    torch.testing.assert_close(loader.model_input(batch, dtype=torch.bfloat16), expected.to(torch.bfloat16),
                               rtol=0, atol=0)
    in_worker = DataLoader(list(zip(images, "abcd")), batch_size=4, num_workers=1, collate_fn=lambda items: loader.collate(
        [loader(item) for item in items]))  # a worker collates into shared memory
    torch.testing.assert_close(loader.model_input(next(iter(in_worker))), expected, rtol=0, atol=0)
    with_pad = loader.collate([sent[0], loader(None), sent[1]])  # the pad's zeros are not a code: float
    assert with_pad.dtype == torch.float32
    torch.testing.assert_close(loader.model_input(with_pad),
                               torch.stack([expected[0], torch.zeros(3, 48, 40), expected[1]]), rtol=0, atol=0)


def test_a_processor_without_codes_sends_its_float_pixels():
    class Plain:  # a baseline's processor: pixel_values only
        size = {"height": 8, "width": 8}

        def __call__(self, images, return_tensors):
            return {"pixel_values": torch.full((1, 3, 8, 8), 0.25)}

    loader = PixelLoader(Plain())
    pixels = loader((png_bytes("red"), "a red square"))
    assert pixels.dtype == torch.float32 and torch.equal(loader.model_input(loader.collate([pixels])), pixels[None])


def test_every_format_pillow_reads_is_an_image_and_other_files_are_listed(tmp_path):
    assert {".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff", ".webp", ".bmp"} <= image_suffixes()
    for name in ("a.png", "b.gif", "c.tiff", "sub/d.JPG"):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4), "red").save(path, format={"png": "PNG", "gif": "GIF", "tiff": "TIFF",
                                                           "JPG": "JPEG"}[name.rsplit(".", 1)[1]])
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    images, others = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in images] == ["a.png", "b.gif", "c.tiff", "sub/d.JPG"]
    assert [(p.name, "suffix '.txt'" in reason) for p, reason in others] == [("notes.txt", True)]
    with pytest.raises(FileNotFoundError, match="no such folder"):
        find_images(tmp_path / "absent")


def test_a_broken_link_is_listed_among_the_files_left_out(tmp_path):
    Image.new("RGB", (4, 4), "red").save(tmp_path / "a.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "deleted.png")
    images, others = find_images(tmp_path)
    assert [p.name for p in images] == ["a.png"]
    assert [(p.name, "link" in reason and "deleted.png" in reason) for p, reason in others] == [("gone.png", True)]


def test_a_link_to_a_folder_is_listed_as_not_followed(tmp_path):
    (tmp_path / "real").mkdir()
    Image.new("RGB", (4, 4), "red").save(tmp_path / "real" / "a.png")
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    images, others = find_images(tmp_path)
    assert [p.name for p in images] == ["a.png"]
    assert [(p.name, "not followed" in reason) for p, reason in others] == [("linked", True)]
