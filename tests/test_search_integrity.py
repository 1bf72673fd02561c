"""A saved search index is verified when loaded, and one run at a time writes it.

Damaged or mismatched files (a truncated gallery or FAISS file, a `faiss.index` copied from another
gallery of the same size, an edited `search_index.json`) are refused with the command that builds
the index again; a second `search.py index` run into the same folder waits for the first, then
builds on its result and says so.
"""

import json
import threading

import numpy as np
import pytest

from nearid import options
from nearid.commands import search
from nearid.search import SearchIndex, SearchIndexChanged, one_writer_of
from tests.helpers import PixelScorer, assert_waits, draw_vector, user_error

DIM = 27


def draw_gallery(folder, count, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for number in range(count):
        draw_vector(rng.uniform(-1, 1, DIM)).save(folder / f"img{number}.png")
    return folder


class PausedScorer(PixelScorer):
    """A PixelScorer that, on its first batch, says it started and waits until released."""

    def __init__(self):
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    def encode(self, pixels):
        self.started.set()
        assert self.release.wait(60), "never released"
        return super().encode(pixels)


def index_argv(tmp_path, images, folder="index"):
    return ["index", "--model", "pixels", "--images", str(images), "--index-dir", str(tmp_path / folder),
            "--cache-dir", str(tmp_path / "cache")]


@pytest.fixture
def pixels(monkeypatch):
    monkeypatch.setattr(options, "load_scorer", lambda args, state: PixelScorer())


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_dim(info_path):
    info = json.loads(info_path.read_text())
    info["dim"] = 2 * info["dim"]
    info_path.write_text(json.dumps(info))


DAMAGES = {
    "a truncated faiss.index": (lambda index, other: truncate(index / "faiss.index"), "faiss.index has"),
    "a truncated gallery file": (lambda index, other: truncate(next((index / "gallery").glob("*.arrow"))),
                                 "gallery/data-"),
    "faiss.index of another gallery of the same size": (
        lambda index, other: (index / "faiss.index").write_bytes((other / "faiss.index").read_bytes()),
        "faiss.index does not match the checksum"),
    "an edited dim": (lambda index, other: edit_dim(index / "search_index.json"), "search_index.json differs"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_or_mismatched_index_is_refused_with_what_to_run(tmp_path, pixels, capsys, damage):
    images, other_images = draw_gallery(tmp_path / "a", 6, 0), draw_gallery(tmp_path / "b", 6, 1)
    search.main(index_argv(tmp_path, images))
    search.main(index_argv(tmp_path, other_images, "other"))
    do, named = DAMAGES[damage]
    do(tmp_path / "index", tmp_path / "other")
    query = ["query", "--index-dir", str(tmp_path / "index"), "--images", str(images / "img0.png"),
             "--cache-dir", str(tmp_path / "cache"), "--model", "pixels", "--output-dir", str(tmp_path / "out")]
    for argv in (query, ["cluster", "--index-dir", str(tmp_path / "index"), "--output-dir", str(tmp_path / "out")]):
        message = user_error(capsys, search.main, argv)
        assert named in message and "search.py index" in message and "--overwrite" in message, message
    search.main([*index_argv(tmp_path, images), "--overwrite"])  # what the message says to run repairs it
    assert len(SearchIndex.load(tmp_path / "index")) == 6


def test_a_second_index_run_into_one_folder_waits_and_reports_what_it_replaced(tmp_path, monkeypatch, caplog):
    first_images, second_images = draw_gallery(tmp_path / "a", 5, 0), draw_gallery(tmp_path / "b", 4, 1)
    first = PausedScorer()
    scorers = iter([first, PixelScorer()])
    monkeypatch.setattr(options, "load_scorer", lambda args, state: next(scorers))
    reports, errors = {}, []

    def run(name, images):
        try:
            reports[name] = search.main(index_argv(tmp_path, images))
        except BaseException as error:  # noqa: BLE001 -- reported below
            errors.append(error)

    threads = {"first": threading.Thread(target=run, args=("first", first_images))}
    with caplog.at_level("WARNING", logger="nearid.locking"):
        threads["first"].start()
        assert first.started.wait(60)
        threads["second"] = threading.Thread(target=run, args=("second", second_images))
        threads["second"].start()
        assert_waits(threads["second"], caplog, "waiting for the search index")
        first.release.set()
        for thread in threads.values():
            thread.join(timeout=120)
    assert not errors, errors
    assert "waiting for the search index" in caplog.text
    assert reports["first"]["added"] == 5
    # The second run started from the first one's index, so its report says what it replaced.
    assert reports["second"]["added"] == 4 and reports["second"]["removed"] == 5
    saved = SearchIndex.load(tmp_path / "index")
    assert sorted(entry["path"] for entry in saved.entries()) == sorted(str(p) for p in second_images.iterdir())


def test_saving_over_an_index_changed_since_it_was_loaded_is_refused(tmp_path, pixels):
    from nearid.search import Embedder

    search.main(index_argv(tmp_path, draw_gallery(tmp_path / "a", 3, 0)))
    embedder = Embedder(PixelScorer(), tmp_path / "cache")
    mine, theirs = SearchIndex.load(tmp_path / "index", embedder), SearchIndex.load(tmp_path / "index", embedder)
    theirs.add([draw_gallery(tmp_path / "b", 2, 1)])
    theirs.save(tmp_path / "index")
    mine.add([draw_gallery(tmp_path / "c", 2, 2)])
    with pytest.raises(SearchIndexChanged, match="saved by another run after this one loaded it"):
        mine.save(tmp_path / "index")
    assert len(SearchIndex.load(tmp_path / "index")) == 5  # their work is kept
    with one_writer_of(tmp_path / "index"):  # the lock is reentrant within a process: save takes it again
        theirs.save(tmp_path / "index")
