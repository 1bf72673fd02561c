"""Heatmaps: the head's attention map, the exact correspondence decomposition, attention on the object."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modeling_nearid import NearIDModel
from nearid import heatmaps
from tests.helpers import make_tiny_siglip


@pytest.fixture
def head(tiny_siglip):
    torch.manual_seed(0)
    model = NearIDModel.from_siglip(tiny_siglip)
    with torch.no_grad():  # a head away from its initialisation: biases non-zero, so their terms count
        for parameter in model.head.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.head.eval()


def test_attention_weights_are_those_of_multihead_attention(head):
    tokens = torch.randn(2, 225, 32)
    ours = head.attention_weights(tokens)  # [B, T, H]
    probe = head.probe.expand(2, -1, -1)
    _, reference = head.attention(probe, tokens, tokens, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(ours, reference[:, :, 0].transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_attention_map_is_the_head_mean_and_sums_to_one(head):
    tokens = torch.randn(3, 225, 32)
    attention = heatmaps.attention_map(head, tokens)
    assert attention.shape == (3, 225)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3))
    torch.testing.assert_close(attention, heatmaps.attention_map(head, tokens, per_head=True).mean(-1))


def test_forward_is_unchanged_by_the_split_into_attention_output(head):
    tokens = torch.randn(2, 225, 32)
    hidden = head.attention.out_proj(head._pool(tokens))
    torch.testing.assert_close(head(tokens), hidden + head.mlp(head.layernorm(hidden)))
    torch.testing.assert_close(head.attention_output(tokens), hidden)


@pytest.mark.parametrize("num_references", [1, 3])
def test_correspondence_shares_sum_exactly_to_the_attention_stage_cosine(head, num_references):
    generated, references = torch.randn(4, 225, 32), torch.randn(num_references, 225, 32)
    result = heatmaps.correspondence_map(head, generated, references)
    assert result.shares.shape == (4, 225) and result.shares.dtype == torch.float64
    # float64 throughout: the decomposition holds to rounding (1e-12), not to float32's 1e-6
    torch.testing.assert_close(result.shares.sum(-1) + result.bias, result.cosine, atol=1e-12, rtol=0)
    # and the cosine is the attention stage's own, against the mean output of the references
    expected = F.cosine_similarity(head.attention_output(generated),
                                   head.attention_output(references).mean(0, keepdim=True), dim=-1)
    torch.testing.assert_close(result.cosine.float(), expected.detach(), atol=1e-5, rtol=0)
    assert result.bias.abs().max() > 0 and result.shares.std() > 0


def test_mask_to_grid_keeps_patches_mostly_inside():
    mask = np.zeros((30, 30), np.uint8)
    mask[:, :15] = 255  # the left half: column 0 is inside, column 1 exactly half (not mostly), column 2 outside
    grid = heatmaps.mask_to_grid(Image.fromarray(mask), 3)
    assert grid.tolist() == [[True, False, False]] * 3
    mask[:, :16] = 255
    assert heatmaps.mask_to_grid(mask, 3).tolist() == [[True, True, False]] * 3


def test_object_attention_share():
    attention = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
    inside = np.array([[[True, False], [False, True]], [[True, True], [True, False]]])
    assert heatmaps.object_attention_share(attention, inside).tolist() == [0.5, 0.75]


def test_overlay_marks_where_the_map_is_high():
    image = np.full((40, 60, 3), 128, np.uint8)
    grid = np.zeros((3, 3), np.float32)
    grid[0, 2] = 1.0  # top right
    drawn = heatmaps.overlay(image, grid, size=60)
    assert drawn.shape == (40, 60, 3) and drawn.dtype == np.uint8
    assert drawn[5, 55].sum() > drawn[35, 5].sum() + 100
    signed = heatmaps.overlay(image, -grid, signed=True, size=60)
    assert signed[5, 55, 2] > signed[5, 55, 0] + 100  # negative is blue


def test_grid_side_refuses_a_non_square_grid():
    with pytest.raises(ValueError, match="square patch grid, got 10"):
        heatmaps.grid_side(10)


def test_python_api_returns_the_maps_as_arrays(tiny_repo, tmp_path):
    from image_processing_nearid import NearIDImageProcessor
    from nearid import IdentityScorer

    paths = []
    for seed in range(3):
        path = tmp_path / f"image{seed}.png"
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    scorer = IdentityScorer(str(tiny_repo))
    maps = scorer.heatmaps(paths[0], paths[1:])
    # the scores come from the same tokens as the maps, and equal the scoring pass's (float32 rounding)
    np.testing.assert_allclose(maps.scores, scorer.score(paths[0], paths[1:], reduce=None), atol=1e-6)
    assert maps.attention.shape == (2, 15, 15) and maps.reference_attention.shape == (1, 15, 15)
    assert maps.correspondence.shape == (2, 15, 15) and isinstance(maps.correspondence, np.ndarray)
    np.testing.assert_allclose(maps.attention.sum(axis=(1, 2)), 1, atol=1e-6)
    np.testing.assert_allclose(maps.correspondence.sum(axis=(1, 2)) + maps.correspondence_bias,
                               maps.attention_cosine, atol=1e-12, rtol=0)
    # the same as the model's own head on its own tokens of the same file
    model = NearIDModel.from_pretrained(tiny_repo, dtype=torch.float32).eval()
    with torch.no_grad():
        tokens = model.forward_features(NearIDImageProcessor.from_pretrained(tiny_repo)(paths[1])["pixel_values"])
        expected = model.head.attention_weights(tokens).mean(-1).reshape(15, 15).numpy()
    np.testing.assert_allclose(maps.attention[0], expected, atol=1e-6)


def write_layout(root, subjects=("cat_toy", "red_cup"), methods=("dreambooth", "ip_adapter"), per_subject=3):
    rng = np.random.default_rng(0)
    for subject in subjects:
        (root / "references" / subject).mkdir(parents=True)
        for r in range(2):
            Image.fromarray(rng.integers(0, 256, (36, 30, 3), dtype=np.uint8)).save(
                root / "references" / subject / f"ref{r}.png")
        for method in methods:
            (root / "generations" / method / subject).mkdir(parents=True)
            for g in range(per_subject):
                Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
                    root / "generations" / method / subject / f"gen{g}.png")
    return root / "references", root / "generations"


def score_argv(repo, root, *extra):
    references, generations = write_layout(root)
    return ["score", "--model", str(repo), "--references", str(references), "--generations", str(generations),
            "--output-dir", str(root / "out"), "--cache-dir", str(root / "cache"), *extra]


def test_score_writes_heatmap_sheets_of_the_lowest_scoring_generations(tiny_repo, tmp_path, monkeypatch):
    from nearid.commands import evaluate

    drawn, encoded, head_copies = [], [], []
    real_sheet, real_tokens, real_deepcopy = heatmaps.score_sheet, heatmaps.image_tokens, heatmaps.copy.deepcopy
    monkeypatch.setattr(heatmaps, "score_sheet", lambda path, scorer, scored: drawn.append(scored) or
                        encoded.append([]) or head_copies.append(0) or real_sheet(path, scorer, scored))
    monkeypatch.setattr(heatmaps, "image_tokens", lambda scorer, images: encoded[-1].extend(images) or
                        real_tokens(scorer, images))

    def deepcopy(value, *args):  # counts the float64 copies of the head a sheet makes
        if isinstance(value, torch.nn.Module) and hasattr(value, "attention_weights"):
            head_copies[-1] += 1
        return real_deepcopy(value, *args)

    monkeypatch.setattr(heatmaps.copy, "deepcopy", deepcopy)
    result = evaluate.main(score_argv(tiny_repo, tmp_path, "--heatmaps", "2"))
    # each sheet runs the backbone once on each of its images (2 generations, their 2 shared references) and
    # copies the head to float64 once
    assert [len(images) for images in encoded] == [4] * 4 and all(len(set(images)) == 4 for images in encoded)
    assert head_copies == [1] * 4
    out = tmp_path / "out"
    sheets = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert sheets == [f"{m}__{s}.png" for m in ("dreambooth", "ip_adapter") for s in ("cat_toy", "red_cup")]
    assert all(Image.open(out / "heatmaps" / name).size[0] > 500 for name in sheets)
    listed = __import__("json").loads((out / "score_results.json").read_text())
    assert {f"heatmaps/{name}" for name in sheets} <= set(listed["files"]) and not listed["warnings"]
    for scored in drawn:  # the two lowest of their group, lowest first
        method, subject = scored[0][0]["method"], scored[0][0]["subject"]
        group = sorted(r["score_mean"] for r in result["records"] if (r["method"], r["subject"]) == (method, subject))
        assert [record["score_mean"] for record, _ in scored] == group[:2]


def test_plain_scoring_runs_no_second_backbone_pass(tiny_repo, tmp_path, monkeypatch):
    from nearid.commands import evaluate

    def forbidden(*args, **kwargs):
        raise AssertionError("a plain scoring run computed backbone tokens")

    monkeypatch.setattr(heatmaps, "image_tokens", forbidden)
    evaluate.main(score_argv(tiny_repo, tmp_path))
    assert not (tmp_path / "out" / "heatmaps").exists()


def test_heatmaps_of_a_baseline_are_a_clear_error(tmp_path, capsys):
    from nearid.commands import evaluate
    from tests.helpers import user_error

    message = user_error(capsys, evaluate.main, score_argv("clip:openai/clip-vit-base-patch32", tmp_path,
                                                           "--heatmaps", "1"))
    assert "--heatmaps draws the NearID head's maps" in message and "'clip' baseline" in message


def test_search_query_overlays_the_query_attention_map(tiny_repo, tmp_path, monkeypatch):
    import json

    from nearid.commands import search

    _, generations = write_layout(tmp_path)
    common = ["--cache-dir", str(tmp_path / "cache")]
    search.main(["index", "--index-dir", str(tmp_path / "index"), "--images", str(generations), "--model",
                 str(tiny_repo), *common])
    overlaid = []
    real_overlay = heatmaps.overlay
    monkeypatch.setattr(heatmaps, "overlay", lambda image, grid, **kw: overlaid.append(grid) or
                        real_overlay(image, grid, **kw))
    query = sorted(generations.rglob("*.png"))[:2]
    search.main(["query", "--index-dir", str(tmp_path / "index"), "--images", *map(str, query), "--heatmap",
                 "--output-dir", str(tmp_path / "out"), *common])
    assert len(overlaid) == 2 and all(float(grid.sum()) == pytest.approx(1, abs=1e-5) for grid in overlaid)
    results = json.loads((tmp_path / "out" / "query_results.json").read_text())
    assert "query_contact_sheet.png" in results["files"] and not results["warnings"]


def test_a_uniform_head_puts_the_object_patch_share_on_the_object(train_synthetic, tmp_path):
    """Known answer: a head whose probe asks nothing attends uniformly, so its attention on the object is
    the share of object patches; the synthetic MTG masks give a share strictly between 0 and 1."""
    from nearid.hub import export_hub_folder
    from nearid.scorers import Scorer
    from tests.helpers import make_tiny_processor

    model = NearIDModel.from_siglip(make_tiny_siglip())
    with torch.no_grad():
        model.head.attention.in_proj_weight[:32] = 0  # W_q = 0 and b_q = 0: every score is 0
        model.head.attention.in_proj_bias[:32] = 0
    folder = export_hub_folder(model, make_tiny_processor(), tmp_path / "uniform", dtype=torch.float32)
    result = heatmaps.mtg_object_attention(Scorer(str(folder)), train_synthetic / "mtg")
    assert result["images"] == 4  # 2 test rows x 2 views
    assert 0.05 < result["object_patches"] < 0.95
    assert result["object_attention"] == pytest.approx(result["object_patches"], abs=1e-6)


def test_mtg_object_attention_reads_each_view_with_its_own_masks_and_no_inpainted_image(tiny_repo, train_synthetic,
                                                                                       monkeypatch):
    """The same figures as object_attention on the views and masks taken row by row from the decoded dataset
    (a random head: a view paired with another view's masks changes them), from the 6 columns it needs."""
    from nearid.data import readers
    from nearid.scorers import Scorer

    scorer = Scorer(str(tiny_repo))
    dataset, _ = readers.open_mtg(train_synthetic / "mtg", "test")
    images, masks = [], []
    for row in range(len(dataset)):
        for view in (1, 2):
            images.append(dataset[row][f"image_{view}_original"])
            masks.append(np.asarray(dataset[row][f"image_{view}_object_mask"].convert("L")))
    expected = heatmaps.object_attention(scorer, images, masks)
    read = []
    image_refs = readers.image_refs
    monkeypatch.setattr(readers, "image_refs", lambda data, column, rows: read.append(column) or
                        image_refs(data, column, rows))

    assert heatmaps.mtg_object_attention(scorer, train_synthetic / "mtg") == pytest.approx(expected, abs=1e-6)
    assert sorted(read) == sorted(f"image_{view}_{kind}" for view in (1, 2)
                                  for kind in ("original", "object_mask", "part_mask"))
