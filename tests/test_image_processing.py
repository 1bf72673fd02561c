"""NearIDImageProcessor: same numbers as transformers' SiglipImageProcessorPil, inputs, errors, config I/O."""

import json
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers.image_utils import load_image
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from image_processing_nearid import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageLoadError,
    ImageTooLargeError,
    NearIDImageProcessor,
)
from tests.helpers import REPO_ROOT, noise

# Not square, so a swapped height/width cannot pass.
SIZE = {"height": 40, "width": 56}
HALF = [0.5, 0.5, 0.5]
# CLIP's statistics: per-channel values catch a channel mix-up that mean = std = 0.5 would hide.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def reference(resample=2, size=SIZE, **kwargs):
    kwargs = {"image_mean": HALF, "image_std": HALF, **kwargs}
    return SiglipImageProcessorPil(size=size, resample=resample, **kwargs)


def ours(resample=2, size=SIZE, **kwargs):
    return NearIDImageProcessor(size=size, resample=resample, **kwargs)


def ref_pixels(processor, images):
    return torch.as_tensor(processor(images, return_tensors="pt")["pixel_values"]).float()


def assert_same(got, expected):
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-6


def palette_with_transparency():
    image = Image.fromarray(noise(30, 50, seed=4)).convert("P")
    image.info["transparency"] = 7  # palette entry 7 is see-through: composited onto white
    return image


IMAGE_KINDS = {
    "RGB": lambda: Image.fromarray(noise(30, 50)),
    "RGBA": lambda: Image.fromarray(noise(30, 50, 4, seed=1)),
    "LA": lambda: Image.fromarray(noise(30, 50, 4, seed=2)).convert("LA"),
    "L": lambda: Image.fromarray(noise(30, 50, 0, seed=3)),
    "P": lambda: Image.fromarray(noise(30, 50, seed=4)).convert("P"),
    "P+transparency": palette_with_transparency,
    "CMYK": lambda: Image.fromarray(noise(30, 50, seed=5)).convert("CMYK"),
    "I;16": lambda: Image.fromarray(np.random.default_rng(6).integers(0, 65536, (30, 50), dtype=np.uint16)),
    "1": lambda: Image.fromarray(noise(30, 50, 0, seed=7)).convert("1"),
    "1x1": lambda: Image.fromarray(noise(1, 1, seed=8)),
    "4000x300": lambda: Image.fromarray(noise(300, 4000, seed=9)),
}


def as_viewers_show(image):
    """The image as viewers show it: a 16-bit one scaled to 8 bits, which PIL's RGB conversion (the
    reference's) would clip at 255 instead; every other mode as it is."""
    if not image.mode.startswith("I;16"):
        return image
    return Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8))


@pytest.mark.parametrize("resample", [2, 3], ids=["bilinear", "bicubic"])
@pytest.mark.parametrize("kind", list(IMAGE_KINDS))
def test_matches_reference_for_every_pil_mode(kind, resample):
    image = IMAGE_KINDS[kind]()
    expected = ref_pixels(reference(resample), as_viewers_show(image))
    assert_same(ours(resample)(image)["pixel_values"], expected)


def test_modes_really_differ():
    """Guards the parametrised test: conversions must produce distinct inputs, not all one image."""
    processor = ours()
    rgba = processor(IMAGE_KINDS["RGBA"]())["pixel_values"]
    dropped_alpha = processor(IMAGE_KINDS["RGBA"]().convert("RGB"))["pixel_values"]
    assert (rgba - dropped_alpha).abs().max() > 0.1


def test_default_config_matches_reference_at_384():
    config = json.loads((REPO_ROOT / "preprocessor_config.json").read_text())
    images = [Image.fromarray(noise(512, 512, seed=s)) for s in range(2)]
    settings = {k: config[k] for k in ("size", "resample", "rescale_factor", "image_mean", "image_std")}
    expected = ref_pixels(SiglipImageProcessorPil(**settings), images)
    got = NearIDImageProcessor.from_dict(config)(images)["pixel_values"]
    assert got.shape == (2, 3, 384, 384)
    assert_same(got, expected)
    assert torch.equal(got, expected)  # the lookup table reproduces the reference arithmetic exactly


@pytest.mark.parametrize(
    "options",
    [
        dict(image_mean=CLIP_MEAN, image_std=CLIP_STD),
        dict(do_rescale=False, image_mean=CLIP_MEAN, image_std=CLIP_STD),
        dict(do_normalize=False),
        dict(do_resize=False),
    ],
    ids=["clip-stats", "no-rescale", "no-normalize", "no-resize"],
)
def test_matches_reference_for_other_settings(options):
    images = [Image.fromarray(noise(30, 50, seed=s)) for s in range(3)]
    expected = ref_pixels(reference(**options), images)
    assert_same(ours(**options)(images)["pixel_values"], expected)


def test_preprocess_overrides_apply_to_one_call_only():
    image = Image.fromarray(noise(30, 50))
    processor = ours(resample=2)
    bicubic = processor(image, resample=3, size={"height": 20, "width": 24})["pixel_values"]
    assert_same(bicubic, ref_pixels(reference(3, size={"height": 20, "width": 24}), image))
    assert processor.resample == 2 and processor.size == SIZE
    assert_same(processor(image)["pixel_values"], ref_pixels(reference(2), image))


def test_numpy_and_tensor_inputs_match_reference():
    rgb = noise(30, 50, seed=10)
    rgba = noise(30, 50, 4, seed=11)
    gray = noise(30, 50, 0, seed=12)
    ref, processor = reference(), ours()
    assert_same(processor(rgb)["pixel_values"], ref_pixels(ref, rgb))
    assert_same(processor(rgb.transpose(2, 0, 1).copy())["pixel_values"], ref_pixels(ref, rgb))  # CHW
    assert_same(processor(rgba)["pixel_values"], ref_pixels(ref, rgba))  # float blend onto white
    # The reference rejects 2-D arrays; a (H, W, 1) array is the same image to it.
    assert_same(processor(gray)["pixel_values"], ref_pixels(ref, gray[:, :, None]))
    assert_same(processor(torch.from_numpy(rgb).permute(2, 0, 1))["pixel_values"], ref_pixels(ref, rgb))
    batch = np.stack([rgb, noise(30, 50, seed=13)])
    assert_same(processor(batch)["pixel_values"], ref_pixels(ref, list(batch)))


def test_ambiguous_array_layout_can_be_stated():
    tall_strip = noise(4, 6, seed=14)  # 4 rows of RGB: the first axis looks like 4 channels
    expected = ref_pixels(reference(), Image.fromarray(tall_strip))
    got = ours()(tall_strip, input_data_format="channels_last")["pixel_values"]
    assert_same(got, expected)


def test_file_paths_give_what_a_viewer_shows_transparency_on_white(tmp_path):
    png = tmp_path / "rgba.png"
    Image.fromarray(noise(30, 50, 4, seed=15)).save(png)
    ref, processor = reference(), ours()
    expected = ref_pixels(ref, Image.open(png))  # the reference composites a PIL image's alpha onto white
    assert_same(processor(str(png))["pixel_values"], expected)
    assert_same(processor(png)["pixel_values"], expected)  # pathlib.Path
    assert_same(processor(png.read_bytes())["pixel_values"], expected)  # encoded bytes
    assert_same(processor({"bytes": None, "path": str(png)})["pixel_values"], expected)  # a datasets image dict
    dropped_alpha = ref_pixels(ref, load_image(str(png)))  # transformers' load_image drops alpha instead
    assert (processor(png)["pixel_values"] - dropped_alpha).abs().max() > 0.1


def test_jpeg_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(noise(24, 40, seed=16)).save(path, exif=exif, quality=95)
    ref, processor = reference(), ours()
    got = processor(path)["pixel_values"]
    assert_same(got, ref_pixels(ref, load_image(str(path))))
    unrotated = ref_pixels(ref, Image.open(path).convert("RGB"))
    assert (got - unrotated).abs().max() > 0.1


def test_mixed_kinds_and_sizes_in_one_batch(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(noise(17, 23, seed=17)).save(path)
    items = [
        Image.fromarray(noise(30, 50, seed=18)),
        noise(64, 20, seed=19),
        str(path),
        IMAGE_KINDS["P+transparency"](),
        torch.from_numpy(noise(9, 11, seed=20)).permute(2, 0, 1),
    ]
    ref = reference()
    expected = torch.cat([ref_pixels(ref, load_image(item) if isinstance(item, str) else item) for item in items])
    got = ours()(items)["pixel_values"]
    assert got.shape == (5, 3, SIZE["height"], SIZE["width"])
    assert_same(got, expected)


def test_return_tensors_np():
    pixel_values = ours()(Image.fromarray(noise(30, 50)), return_tensors="np")["pixel_values"]
    assert isinstance(pixel_values, np.ndarray) and pixel_values.dtype == np.float32
    assert pixel_values.shape == (1, 3, 40, 56)


def test_corrupt_file_error_names_the_file(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ImageLoadError, match="corrupt.png"):
        ours()(path)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_file_error_names_the_file(tmp_path, suffix):
    path = tmp_path / f"truncated.{suffix}"
    Image.fromarray(noise(64, 64, seed=21)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=f"truncated.{suffix}"):
        ours()([Image.fromarray(noise(8, 8)), path])


def test_missing_file_and_url_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ours()(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="does not download"):
        ours()("https://example.com/cat.png")


def header_only_png(path, width, height):
    """A PNG whose header says width x height but which holds no pixel data (cheap at any size)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


def test_decompression_bomb_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    header_only_png(path, 20, 20)
    processor = ours(max_image_pixels=100)
    # Decoding would fail with ImageLoadError (no pixel data): the size check must come first.
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png.*20x20 = 400 pixels.*max_image_pixels"):
        processor(path)
    with pytest.raises(ImageTooLargeError, match="400 pixels"):
        processor(Image.fromarray(noise(20, 20)))
    with pytest.raises(ImageTooLargeError, match="400 pixels"):
        processor(noise(20, 20))
    assert ours(max_image_pixels=400)(Image.fromarray(noise(20, 20)))["pixel_values"].shape[0] == 1


def test_pillows_process_wide_limit_is_respected_and_never_changed(tmp_path, monkeypatch):
    """Our limit is checked on the header; Pillow's own (a global the caller owns) is never lifted."""
    path = tmp_path / "big.png"
    Image.fromarray(noise(20, 20)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow refuses 400 > 2 * 50 pixels
    for limit in (None, 10**6):  # ours would allow it: Pillow's applies, and the message says which it is
        with pytest.raises(ImageTooLargeError, match=r"big\.png.*PIL\.Image\.MAX_IMAGE_PIXELS"):
            ours(max_image_pixels=limit)(path)
    assert Image.MAX_IMAGE_PIXELS == 50
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageTooLargeError, match=r"big\.png.*20x20 = 400 pixels.*max_image_pixels"):
        ours(max_image_pixels=100)(path)  # ours is the stricter one
    got = ours(max_image_pixels=None)(path)["pixel_values"]
    assert_same(got, ref_pixels(reference(), Image.fromarray(noise(20, 20))))


class _WatchedModule(type(Image)):
    """A module type that records every assignment to Image.MAX_IMAGE_PIXELS."""

    assignments = []

    def __setattr__(self, name, value):
        if name == "MAX_IMAGE_PIXELS":
            _WatchedModule.assignments.append(value)
        super().__setattr__(name, value)


def test_decoding_a_bomb_never_touches_pillows_global_limit(tmp_path, monkeypatch):
    """Another thread's Image.open must always see Pillow's guard: we never lift it, even briefly."""
    bomb = tmp_path / "bomb.png"
    header_only_png(bomb, 20000, 20000)  # 400 M pixels: above Pillow's default hard limit
    monkeypatch.setattr(Image, "__class__", _WatchedModule)
    _WatchedModule.assignments.clear()
    for limit in (None, 10**12, 100):
        with pytest.raises(ImageTooLargeError):
            ours(max_image_pixels=limit)(bomb)
    assert _WatchedModule.assignments == []


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (123, TypeError, "unsupported type int"),
        (np.zeros((8, 8, 3), dtype=np.float32), TypeError, "float32"),
        (np.zeros((8, 8, 2), dtype=np.uint8), ValueError, r"\(8, 8, 2\)"),
        (np.zeros((2, 8, 8, 3, 1), dtype=np.uint8), ValueError, r"\(2, 8, 8, 3, 1\)"),
        ([], ValueError, "no images"),
    ],
    ids=["int", "float-array", "two-channels", "five-dims", "empty"],
)
def test_bad_inputs_say_what_was_given(bad, error, message):
    with pytest.raises(error, match=message):
        ours()(bad)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="image_std"):
        NearIDImageProcessor(image_std=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="resample"):
        NearIDImageProcessor(resample=9)
    with pytest.raises(ValueError, match="size"):
        NearIDImageProcessor(size={"shortest_edge": 384})
    with pytest.raises(ValueError, match="max_image_pixels"):
        NearIDImageProcessor(max_image_pixels=-1)
    with pytest.raises(TypeError, match="resampel"):
        ours()(noise(8, 8), resampel=3)
    with pytest.raises(ValueError, match="do_resize=False"):
        ours(do_resize=False)([noise(8, 8), noise(9, 8)])
    with pytest.raises(ValueError, match="do_convert_rgb=False"):
        ours(do_convert_rgb=False)(Image.fromarray(noise(8, 8, 0)))


def test_save_and_load_keep_every_value(tmp_path):
    processor = NearIDImageProcessor(
        size={"height": 224, "width": 200},
        resample=3,
        rescale_factor=1 / 127.5,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=False,
        max_image_pixels=None,
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["max_image_pixels"] is None and saved["resample"] == 3
    loaded = NearIDImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.max_image_pixels is None and loaded.size == {"height": 224, "width": 200}
    image = Image.fromarray(noise(30, 50))
    assert torch.equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])
    # The way the decompression-bomb error tells users to raise the limit.
    assert NearIDImageProcessor.from_pretrained(tmp_path, max_image_pixels=1234).max_image_pixels == 1234


def test_shipped_config_holds_the_so400m_defaults():
    config = json.loads((REPO_ROOT / "preprocessor_config.json").read_text())
    assert config["auto_map"] == {"AutoImageProcessor": "image_processing_nearid.NearIDImageProcessor"}
    assert config["image_processor_type"] == "NearIDImageProcessor"
    assert config["size"] == {"height": 384, "width": 384} and config["resample"] == 2
    assert config["rescale_factor"] == pytest.approx(1 / 255, abs=0)
    assert config["image_mean"] == HALF and config["image_std"] == HALF
    assert config["max_image_pixels"] == DEFAULT_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS
    loaded = NearIDImageProcessor.from_dict(config).to_dict()
    assert {k: v for k, v in loaded.items() if k in config} == config


def test_loads_through_auto_image_processor_as_remote_code(remote_code_checks):
    """A folder with only the processor's code and config, loaded as a Hub user does (tests/remote_code_checks.py)."""
    check = remote_code_checks["image_processor"]
    name, module, shape, total = check.stdout.split()
    assert name == "NearIDImageProcessor"
    assert module.startswith("transformers_modules.")  # imported from the cache, not this checkout
    assert module in check.imported  # imported by this check, not found imported by an earlier one
    assert shape == "1x3x384x384"
    expected = NearIDImageProcessor()(check.folder / "image.png")["pixel_values"].sum().item()
    assert float(total) == expected


# Files that keep each mode the decode must handle, and an EXIF-rotated JPEG.
def _exif_jpeg(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(noise(24, 40, seed=30)).save(path, exif=exif, quality=95)


ENCODED_KINDS = {
    "exif.jpg": _exif_jpeg,
    "rgba.png": lambda path: IMAGE_KINDS["RGBA"]().save(path),
    "p_transparency.png": lambda path: IMAGE_KINDS["P+transparency"]().save(path),
    "la.png": lambda path: IMAGE_KINDS["LA"]().save(path),
    "i16.png": lambda path: IMAGE_KINDS["I;16"]().save(path),
    "cmyk.jpg": lambda path: IMAGE_KINDS["CMYK"]().save(path, quality=95),
}


@pytest.mark.parametrize("name", list(ENCODED_KINDS))
def test_every_encoded_form_gives_the_pixels_a_viewer_shows(tmp_path, name):
    path = tmp_path / name
    ENCODED_KINDS[name](path)
    with Image.open(path) as shown:  # what a viewer shows: EXIF orientation applied
        expected = ref_pixels(reference(), as_viewers_show(ImageOps.exif_transpose(shown)))
    processor = ours()
    for form in (path, str(path), path.read_bytes(), {"bytes": path.read_bytes(), "path": None},
                 {"bytes": None, "path": str(path)}):
        assert_same(processor(form)["pixel_values"], expected)


def test_exif_rotation_applies_to_encoded_images_only(tmp_path):
    path = tmp_path / "exif.jpg"
    _exif_jpeg(path)
    with Image.open(path) as raw:
        raw.load()
        as_given = ours()(raw)["pixel_values"]  # a PIL image is used as given, like transformers
        assert_same(as_given, ref_pixels(reference(), raw))
    assert (ours()(path)["pixel_values"] - as_given).abs().max() > 0.1


@pytest.mark.parametrize("empty", [np.zeros((0, 10, 3), np.uint8), np.zeros((10, 0), np.uint8)])
def test_an_image_without_pixels_is_refused(empty):
    with pytest.raises(ValueError, match="no pixels"):
        ours()(empty)


def test_an_ambiguous_array_layout_warns_and_names_input_data_format():
    strip = noise(4, 300, seed=31)[..., :3].reshape(4, 300, 3)  # 4 rows of RGB, or 4 channels?
    with pytest.warns(UserWarning, match="input_data_format"):
        first = ours()(strip)["pixel_values"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        last = ours()(strip, input_data_format="channels_last")["pixel_values"]
    assert_same(last, ref_pixels(reference(), Image.fromarray(strip)))
    assert (first - last).abs().max() > 0.1


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_a_16_bit_image_is_scaled_to_8_bits_not_clipped_white(tmp_path, mode):
    from image_processing_nearid import load_image as decode

    grey = np.full((12, 16), 257 * 100, np.uint16)  # 16-bit mid-dark grey: 100 in 8 bits
    grey[:6] = 65535  # the top half white
    image = Image.frombytes(mode, (16, 12), grey.astype(">u2" if mode.endswith("B") else "<u2").tobytes())
    image.save(tmp_path / "scan16.png")
    for form in (image, tmp_path / "scan16.png", (tmp_path / "scan16.png").read_bytes()):
        pixels = np.asarray(decode(form))
        assert pixels.shape == (12, 16, 3) and (pixels[6:] == 100).all() and (pixels[:6] == 255).all()


def test_the_16_bit_rule_changes_the_store_fingerprint(monkeypatch):
    """Embeddings cached when 16-bit images were clipped must not be reused."""
    from nearid.store import format as store_format

    args = ("pooled:nearid", "weights", {"size": 30}, {"dtype": "float32"})
    now = store_format.fingerprint(*args)
    clipped_rules = "exif-transpose+alpha-on-white/1"  # the rules before 16-bit images were scaled
    assert store_format.DECODE_RULES != clipped_rules
    monkeypatch.setattr(store_format, "DECODE_RULES", clipped_rules)
    assert store_format.fingerprint(*args) != now
