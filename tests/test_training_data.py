"""Tests of nearid.training_data: the 6-slot sample layout, its per-epoch draws and the row subsets.

Expected keys are computed here straight from the dataset columns (sha256 of the encoded bytes), so
the checks do not trust the module's own bookkeeping.
"""

import hashlib
import io
import re
from collections import Counter

import datasets
import numpy as np
import PIL.Image
import pytest
from datasets import Dataset, Features, Value, load_from_disk
from datasets import Image as HFImage

from nearid import training_data as td
from nearid.commands import synthetic as syn
from nearid.data import nearid_benchmark, split_files

SOURCES = ("flux", "sdxl", "qwen")
SYNTHETIC = ["--num-identities", "14", "--image-size", "16", "--seed", "3", "--sources", *SOURCES,
             "--missing-distractor-rate", "0.4", "--two-view-fraction", "0.3", "--mtg-train", "3",
             "--mtg-test", "1", "--dreambench-subjects", "1", "--dreambench-prompts", "1",
             "--dreambench-categories", "object"]
EPOCHS = range(40)


pytestmark = pytest.mark.usefixtures("isolated_cache")  # conftest.py


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "data"
    syn.main(["--output-dir", str(out), *SYNTHETIC])
    return out


@pytest.fixture(scope="module")
def bench(root):
    return nearid_benchmark.join_sources(load_from_disk(str(root / "positives")),
                                         {name: load_from_disk(str(root / name)) for name in SOURCES})


@pytest.fixture(scope="module")
def mtg(root):
    return load_from_disk(str(root / "mtg"))["train"]


@pytest.fixture(scope="module")
def training(bench, mtg):
    return td.build_training_set(bench, mtg=mtg, mtg_repeats=2)


def column_hashes(dataset, column):
    """sha256 of each row's encoded image in `column`, None where missing."""
    refs = dataset.cast_column(column, HFImage(decode=False))[column]
    return [None if ref is None else hashlib.sha256(ref["bytes"]).hexdigest() for ref in refs]


@pytest.fixture(scope="module")
def layout(bench):
    """{row: (view keys [3], {source: distractor keys [3]})} from the datasets directly."""
    views = [column_hashes(bench.positives, c) for c in bench.view_columns]
    distractors = {name: [column_hashes(bench.sources[name], c) for c in bench.distractor_columns[name]]
                   for name in SOURCES}
    return {row: ([v[row] for v in views], {name: [d[row] for d in columns] for name, columns in distractors.items()})
            for row in range(len(bench))}


def candidates(layout, row, view):
    """{distractor key: source} of the present distractors in the scene of `view` of `row`."""
    return {keys[view]: name for name, keys in layout[row][1].items() if keys[view] is not None}


def nearid_indices(training):
    return [i for i, s in enumerate(training.samples) if s.kind == "nearid"]


# --------------------------------------------------------------------------------------------------
# Layout of NearID samples


def test_counts_and_sample_rows(training, bench, mtg):
    info = training.describe()
    assert info["nearid_rows"] == len(bench) and info["nearid_excluded_rows"] == 0
    assert info["mtg_rows"] == len(mtg) and info["mtg_repeats"] == 2
    assert len(training) == info["samples"] == len(bench) + 2 * len(mtg)
    assert info["sources"] == list(SOURCES)
    assert info["nearid_two_view_rows"] == sum(n == 2 for n in bench.positives["n_images"])
    assert [training.samples[i].row for i in nearid_indices(training)] == list(range(len(bench)))


def test_negative_is_same_scene_distractor_of_its_positive(training, layout):
    checked_present = checked_padded = 0
    for index in nearid_indices(training):
        row = training.samples[index].row
        views = layout[row][0]
        for epoch in range(10):
            slots = training.sample_slots(epoch, index, seed=7)
            assert sorted(k for k in slots[:3] if k) == sorted(k for k in views if k)
            for s in range(3):
                if slots[s] is None:
                    assert slots[3 + s] is None
                    continue
                expected = candidates(layout, row, views.index(slots[s]))
                if expected:
                    assert slots[3 + s] in expected
                    checked_present += 1
                else:
                    assert slots[3 + s] is None  # padded, never another scene's distractor
                    checked_padded += 1
    assert checked_present and checked_padded  # the data exercises both cases


def test_view_without_any_distractor_is_padded_every_epoch(training, layout):
    lonely = [(i, v) for i in nearid_indices(training) for v, key in enumerate(layout[training.samples[i].row][0])
              if key is not None and not candidates(layout, training.samples[i].row, v)]
    assert lonely, "the synthetic data should have a view that no source has a distractor for"
    assert training.describe()["nearid_views_without_distractor"] == len(lonely)
    for index, view in lonely:
        key = layout[training.samples[index].row][0][view]
        for epoch in range(20):
            slots = training.sample_slots(epoch, index, seed=0)
            assert slots[3 + slots.index(key)] is None


def test_two_view_rows_pad_pos2_and_neg_p2(training, layout):
    two_view = [i for i in nearid_indices(training)
                if sum(k is not None for k in layout[training.samples[i].row][0]) == 2]
    assert two_view
    for index in two_view:
        for epoch in range(5):
            slots = training.sample_slots(epoch, index, seed=1)
            assert slots[2] is None and slots[5] is None
            assert slots[0] is not None and slots[1] is not None
            assert td.slot_mask(slots)[:3] == [True, True, False]


def test_every_present_view_becomes_anchor_and_anchor_is_uniform(training, layout):
    by_view = Counter()
    for index in nearid_indices(training):
        views = layout[training.samples[index].row][0]
        anchors = [training.sample_slots(epoch, index, seed=2)[0] for epoch in range(300)]
        assert set(anchors) == {k for k in views if k is not None}
        if all(views):
            by_view.update(views.index(a) for a in anchors)
    shares = np.array([by_view[v] for v in range(3)]) / sum(by_view.values())
    assert sum(by_view.values()) >= 900
    np.testing.assert_allclose(shares, 1 / 3, atol=0.05)


def test_source_draw_covers_every_candidate(training, layout):
    drawn_sources = set()
    multi = 0
    for index in nearid_indices(training):
        row = training.samples[index].row
        views = layout[row][0]
        drawn = {v: set() for v in range(3)}
        for epoch in EPOCHS:
            slots = training.sample_slots(epoch, index, seed=3)
            for s in range(3):
                if slots[s] is not None and slots[3 + s] is not None:
                    drawn[views.index(slots[s])].add(slots[3 + s])
        for v in range(3):
            expected = candidates(layout, row, v)
            assert drawn[v] == set(expected) if views[v] else not drawn[v]
            multi += len(expected) > 1
            drawn_sources.update(expected[k] for k in drawn[v])
    assert multi and drawn_sources == set(SOURCES)


# --------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_and_epoch_give_same_slots_after_rebuild(training, bench, mtg):
    again = td.build_training_set(bench, mtg=mtg, mtg_repeats=2)
    for epoch in (0, 5):
        assert again.epoch_order(epoch, seed=11) == training.epoch_order(epoch, seed=11)
        assert ([again.sample_slots(epoch, i, 11) for i in range(len(again))]
                == [training.sample_slots(epoch, i, 11) for i in range(len(training))])


def test_slots_do_not_depend_on_visiting_order(training):
    forward = [training.sample_slots(4, i, 9) for i in range(len(training))]
    backward = [training.sample_slots(4, i, 9) for i in reversed(range(len(training)))]
    assert backward[::-1] == forward


def test_other_epoch_or_seed_changes_anchors_and_sources(training):
    def all_slots(epoch, seed):
        return [training.sample_slots(epoch, i, seed) for i in range(len(training))]

    base = all_slots(0, 0)
    for other in (all_slots(1, 0), all_slots(0, 1)):
        assert any(a[0] != b[0] for a, b in zip(base, other))
        # Same view order but another distractor source: the source draw changed too.
        assert any(a[:3] == b[:3] and a[3:] != b[3:] for a, b in zip(base, other))


def test_epoch_order_is_a_seeded_permutation(training):
    order = training.epoch_order(0, seed=5)
    assert sorted(order) == list(range(len(training)))
    assert order == training.epoch_order(0, seed=5)
    assert order != training.epoch_order(1, seed=5) and order != training.epoch_order(0, seed=6)


def test_seed_and_epoch_must_be_non_negative_integers(training):
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        training.sample_slots(0, 0, seed=-1)
    with pytest.raises(ValueError, match="epoch must be a non-negative integer, got 1.5"):
        training.epoch_order(1.5, seed=0)
    with pytest.raises(IndexError, match=f"sample index {len(training)} is out of range"):
        training.sample_slots(0, len(training), seed=0)


# --------------------------------------------------------------------------------------------------
# MTG


def test_mtg_layout(training, mtg):
    originals = [column_hashes(mtg, c) for c in ("image_1_original", "image_2_original")]
    inpainted = [column_hashes(mtg, c) for c in ("image_1_inpainted", "image_2_inpainted")]
    mtg_indices = [i for i, s in enumerate(training.samples) if s.kind == "mtg"]
    assert Counter(training.samples[i].row for i in mtg_indices) == {row: 2 for row in range(len(mtg))}
    anchors = set()
    for index in mtg_indices:
        row = training.samples[index].row
        for epoch in range(12):
            slots = training.sample_slots(epoch, index, seed=4)
            views = [originals[0][row], originals[1][row]]
            first, second = views.index(slots[0]), views.index(slots[1])
            assert first != second
            assert slots[3] == inpainted[first][row] and slots[4] == inpainted[second][row]
            assert slots[2] is None and slots[5] is None
            anchors.add((row, first))
    assert anchors == {(row, v) for row in range(len(mtg)) for v in (0, 1)}


def test_mtg_repeats_are_separate_samples_with_own_draws(training):
    by_row = {}
    for i, sample in enumerate(training.samples):
        if sample.kind == "mtg":
            by_row.setdefault(sample.row, []).append(i)
    for row, (first, second) in by_row.items():
        assert any(training.sample_slots(e, first, 0)[0] != training.sample_slots(e, second, 0)[0] for e in range(20))


def test_mtg_repeats_default_and_zero(bench, mtg):
    assert len(td.build_training_set(bench, mtg=mtg)) == len(bench) + 4 * len(mtg)
    assert len(td.build_training_set(bench, mtg=mtg, mtg_rows=[1], mtg_repeats=3)) == len(bench) + 3
    assert len(td.build_training_set(bench, mtg=mtg, mtg_repeats=0)) == len(bench)


def test_mtg_errors(bench, mtg):
    with pytest.raises(ValueError, match=r"MTG training dataset lacks columns \['image_2_inpainted'\]"):
        td.build_training_set(bench, mtg=mtg.remove_columns(["image_2_inpainted"]))
    with pytest.raises(ValueError, match="mtg_repeats must be a non-negative integer"):
        td.build_training_set(bench, mtg=mtg, mtg_repeats=-1)
    with pytest.raises(ValueError, match=r"mtg is a mapping of splits \['train'\], not one split; pass the train split"):
        td.build_training_set(bench, mtg=datasets.DatasetDict({"train": mtg}))
    with pytest.raises(ValueError, match="mtg_rows was given without an MTG dataset"):
        td.build_training_set(bench, mtg_rows=[0])


# --------------------------------------------------------------------------------------------------
# Images: keys, used keys, no decoding


def test_used_keys_is_the_union_of_slots(training):
    epochs = range(3)
    union = {k for e in epochs for i in range(len(training)) for k in training.sample_slots(e, i, 6) if k}
    assert training.used_keys(epochs, seed=6) == union
    assert union < set(training.items)  # 3 epochs leave some distractors unused ...
    assert training.used_keys(EPOCHS, seed=6) == set(training.items)  # ... many epochs use them all


def test_items_read_the_encoded_image_and_name_its_place(training):
    places = set()
    for key in training.items:
        ref, where = training.items[key]
        assert hashlib.sha256(ref["bytes"]).hexdigest() == key
        match = re.fullmatch(r"(positives|source \w+|MTG) row \d+ column (img|nimg|image_)\w*", where)
        assert match, where
        places.add(match.group(1))
    assert places == {"positives", "MTG", *(f"source {name}" for name in SOURCES)}


def test_dropping_an_image_keeps_other_samples_draws(bench, mtg, layout):
    training = td.build_training_set(bench, mtg=mtg, mtg_repeats=2)
    before = {(s.kind, s.row, s.repeat): [training.sample_slots(e, i, 8) for e in range(5)]
              for i, s in enumerate(training.samples)}
    three_view = next(row for row in range(len(bench)) if all(layout[row][0]))
    training.drop_images({layout[three_view][0][0]})
    after = {(s.kind, s.row, s.repeat): [training.sample_slots(e, i, 8) for e in range(5)]
             for i, s in enumerate(training.samples)}
    assert after.keys() == before.keys()
    changed = [sample for sample in before if after[sample] != before[sample]]
    assert changed == [("nearid", three_view, 0)]


def test_building_decodes_nothing(bench, mtg, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    training = td.build_training_set(bench, mtg=mtg)
    assert training.used_keys(range(2), seed=0)


# --------------------------------------------------------------------------------------------------
# Row subsets and splits


def test_rows_outside_the_training_rows_never_appear(root, bench, layout):
    train = split_files.load_split_indices(root / "splits" / "train.json", len(bench))
    training = td.build_training_set(bench, rows=train)
    held_out = {key for row in set(range(len(bench))) - set(train)
                for key in [*layout[row][0], *(k for keys in layout[row][1].values() for k in keys)] if key}
    assert held_out
    assert {s.row for s in training.samples} == set(train)
    assert not held_out & set(training.items)
    assert not held_out & training.used_keys(EPOCHS, seed=0)


def test_training_rows_refuses_overlap_with_held_out_splits(root, bench):
    splits = {name: split_files.load_split_indices(root / "splits" / f"{name}.json", len(bench))
              for name in ("train", "val", "test")}
    held_out = {"val": splits["val"], "test": splits["test"]}
    assert td.training_rows(len(bench), splits["train"], held_out) == splits["train"]
    leaked = splits["train"] + splits["test"][:1]
    with pytest.raises(ValueError, match=rf"'train' and 'test' share 1 rows \(first: {splits['test'][0]}\)"):
        td.training_rows(len(bench), leaked, {"test": splits["test"]})
    with pytest.raises(ValueError, match="'val' and 'test' share"):
        td.training_rows(len(bench), None, {"val": splits["val"], "test": splits["val"]})


def test_training_rows_without_train_split_excludes_held_out(root, bench):
    test = split_files.load_split_indices(root / "splits" / "test.json", len(bench))
    rows = td.training_rows(len(bench), held_out={"test": test})
    assert rows == sorted(set(range(len(bench))) - set(test))
    assert td.training_rows(len(bench)) == list(range(len(bench)))


# --------------------------------------------------------------------------------------------------
# Hand-made benchmark: exclusions, gaps between views, errors


def png(colour):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def image_table(prefix, cells):
    """Dataset with `id` and `<prefix>1..3`; cells[row] lists 3 colours or None."""
    features = Features({"id": Value("string"), **{f"{prefix}{k}": HFImage() for k in (1, 2, 3)}})
    columns = {"id": [f"r{row}" for row in range(len(cells))]}
    for k in range(3):
        columns[f"{prefix}{k + 1}"] = [None if row[k] is None else png(row[k]) for row in cells]
    return Dataset.from_dict(columns, features=features)


@pytest.fixture
def small():
    positives = image_table("img", [[(10, 0, 0), (20, 0, 0), (30, 0, 0)],   # 3 views
                                    [(40, 0, 0), None, None],               # 1 view: excluded
                                    [(50, 0, 0), None, (60, 0, 0)]])        # views 1 and 3
    a = image_table("nimg", [[(0, 1, 0), (0, 2, 0), None], [(0, 4, 0), None, None], [None, None, (0, 6, 0)]])
    b = image_table("nimg", [[None, None, (0, 0, 3)], [None, None, None], [None, None, None]])
    return nearid_benchmark.join_sources(positives, {"a": a, "b": b})


def key_of(colour):
    return hashlib.sha256(png(colour)["bytes"]).hexdigest()


def test_rows_with_fewer_than_two_views_are_excluded_and_counted(small):
    training = td.build_training_set(small)
    assert [s.row for s in training.samples] == [0, 2]
    info = training.describe()
    counts = ("nearid_excluded_rows", "nearid_two_view_rows", "nearid_views_without_distractor")
    assert [info[name] for name in counts] == [1, 1, 1]
    assert key_of((40, 0, 0)) not in training.items and key_of((0, 4, 0)) not in training.items
    assert info["images"] == len(training.items) == 9


def test_views_with_a_gap_keep_their_own_scene(small):
    training = td.build_training_set(small)
    first, third, distractor = key_of((50, 0, 0)), key_of((60, 0, 0)), key_of((0, 6, 0))
    layouts = {tuple(training.sample_slots(e, 1, 0)) for e in range(20)}
    assert layouts == {(first, third, None, None, distractor, None), (third, first, None, distractor, None, None)}
    row0 = {tuple(training.sample_slots(e, 0, 0)) for e in range(20)}
    pairs = {(slots[s], slots[3 + s]) for slots in row0 for s in range(3)}
    assert pairs == {(key_of((10, 0, 0)), key_of((0, 1, 0))), (key_of((20, 0, 0)), key_of((0, 2, 0))),
                     (key_of((30, 0, 0)), key_of((0, 0, 3)))}


def test_dropped_images_become_missing(small):
    training = td.build_training_set(small)
    slots_before = training.sample_slots(0, 0, seed=0)
    training.drop_images({key_of((20, 0, 0)), key_of((0, 0, 3)), key_of((60, 0, 0))})
    assert [s.row for s in training.samples] == [0]  # row 2 kept one view only
    info = training.describe()
    assert (info["nearid_excluded_rows"], info["dropped_images"], info["images"]) == (2, 3, 3)
    for epoch in range(20):
        slots = training.sample_slots(epoch, 0, seed=0)
        assert set(slots[:2]) == {key_of((10, 0, 0)), key_of((30, 0, 0))} and slots[2] is None
        assert slots[3 + slots.index(key_of((10, 0, 0)))] == key_of((0, 1, 0))
        assert slots[3 + slots.index(key_of((30, 0, 0)))] is None  # its only distractor was dropped
    assert set(training.items) == {key_of((10, 0, 0)), key_of((30, 0, 0)), key_of((0, 1, 0))}
    assert slots_before != training.sample_slots(0, 0, seed=0)
    with pytest.raises(ValueError, match="leaves no training sample with 2 or more views"):
        training.drop_images({key_of((10, 0, 0))})
    assert training.describe()["nearid_excluded_rows"] == 2 and len(training) == 1  # unchanged by the refusal


def test_empty_training_set_is_an_error(small):
    with pytest.raises(ValueError, match="no training samples: 1 of 1 NearID rows have fewer than 2 views"):
        td.build_training_set(small, rows=[1])


def test_mismatched_sources_are_refused(small):
    short = nearid_benchmark.NearIDBenchmark(small.positives, {"a": small.sources["a"].select([0, 1])},
                                             small.view_columns, {"a": small.distractor_columns["a"]})
    with pytest.raises(ValueError, match="source 'a' has 2 rows but the positives have 3.*join_sources"):
        td.build_training_set(short)
    missing = nearid_benchmark.NearIDBenchmark(small.positives, {"a": small.sources["a"].remove_columns(["nimg2"])},
                                               small.view_columns, {"a": small.distractor_columns["a"]})
    with pytest.raises(ValueError, match=r"distractor source 'a' lacks columns \['nimg2'\]"):
        td.build_training_set(missing)


def test_rows_are_checked(small):
    with pytest.raises(ValueError, match="row index 3 is out of range for a dataset of 3 rows"):
        td.build_training_set(small, rows=[0, 3])


def test_slot_mask():
    assert td.slot_mask(["a", None, "b", None, "c", None]) == [True, False, True, False, True, False]
