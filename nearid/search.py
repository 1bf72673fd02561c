"""Identity search and clustering over a gallery of images (docs/method.md section 6).

A `SearchIndex` is a gallery of images embedded by one scorer, searchable by cosine similarity:

    from nearid.scorers import Scorer
    from nearid.search import Embedder, SearchIndex

    index = SearchIndex.create(Embedder(Scorer("Aleksandar/nearid-siglip2")))
    index.add(["gallery/"])                        # files and folders (recursively)
    result = index.search(["query.png"], k=10)     # or [Q, D] embeddings; combine="mean" / "max"
    labels = index.cluster(threshold=0.8)          # one identity cluster per image
    index.save("gallery_index")
    index = SearchIndex.load("gallery_index", embedder)  # refused if the embedder is another model

Images are embedded through the one embed-once store (`nearid.evaluation.protocol.embed_images`): the same
decode and processor as evaluation, each image computed once per scorer, resumable, split between
processes under torchrun / accelerate launch. Adding images to an index embeds only content the
gallery does not hold yet; `sync` makes the gallery exactly the images listed (removed files leave).

On disk an index is a folder:

    search_index.json   format, the scorer's fingerprint and provenance, the FAISS settings, the
                        measured recall of an approximate index, bytes per image, the checksums
                        of every other file and of itself (written last)
    gallery/            a Hugging Face `datasets` Dataset (`save_to_disk`), one row per image: its
                        content hash, its place (file path, or dataset, split, row and column) and
                        its embedding in float16
    faiss.index         the FAISS index over the embedding column (`Dataset.add_faiss_index`)

The folder is written under a staging name and swapped in when complete (`nearid.io.replacing_folder`),
so an interrupted save leaves the previous index (or none), never a half-written one that looks
complete. Loading verifies every file against the checksums recorded at save (`nearid.integrity`):
a truncated or damaged file, a `faiss.index` from another gallery, or an edited `search_index.json`
is refused with the command that builds the index again. One run at a time writes an index
(`one_writer_of`, a lock beside the folder): `search.py index` holds it from loading the index to
saving it, so a second run waits and then builds on the first run's result; a save that would
replace an index changed since it was loaded is refused.

Search is exact inner product (`IndexFlatIP`) by default; IVF and HNSW are options for large
galleries, and their recall@10 against exact search is measured when the index is built.
Clustering is `nearid.clustering`'s average linkage on cosine distance.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nearid.ann import IndexSettings, recall_against_exact
from nearid.cli import DatasetSource
from nearid.clustering import IdentityLinkage
from nearid.data import readers
from nearid.evaluation import protocol
from nearid.images import find_images, link_problem, load_image
from nearid.integrity import ALGORITHM, checksum_json, damaged, manifest, manifest_of_tree
from nearid.io import atomic_write_json, read_json, recover_folder, replacing_folder, set_aside_path
from nearid.locking import one_writer
from nearid.store.fill import FillOptions
from nearid.store.image_index import ImageIndex

FORMAT_VERSION = 2  # 2: checksums of every file
INFO_FILE = "search_index.json"
GALLERY_DIR = "gallery"
FAISS_FILE = "faiss.index"
EMBEDDING = "embedding"  # the gallery column, and the name of its FAISS index
PLACE_FIELDS = ("path", "dataset", "split", "row", "column")  # where an image came from
COMBINE = ("each", "mean", "max")
EMPTY_CELL = "no image in this row"  # the reason a dataset row without an image is left out


class SearchIndexMismatch(ValueError):
    """The index was built by another scorer (weights, preprocessing or dimension)."""


class SearchIndexDamaged(ValueError):
    """A file of a saved index differs from what was written (truncated, damaged, replaced or edited)."""


class SearchIndexChanged(ValueError):
    """Another run saved the index after this one loaded it; saving now would drop that run's work."""


# --------------------------------------------------------------------------------------------------
# Embedding


@dataclass
class Embedder:
    """A scorer (`nearid.scorers.Scorer`) with its embed-once store: an `ImageIndex` in, embeddings out."""

    scorer: Any
    cache_dir: str | Path = ".cache/embeddings"
    options: FillOptions = field(default_factory=FillOptions)
    state: Any = None  # accelerate's PartialState when several processes embed together

    def __call__(self, images: ImageIndex) -> protocol.Embedded:
        return protocol.embed_images(self.scorer, images, self.cache_dir, self.options, self.state,
                                       allow_none=True)


# --------------------------------------------------------------------------------------------------
# The gallery's images


@dataclass(frozen=True)
class DatasetColumn:
    """An image column of a dataset to index; `name` says where the dataset came from (Hub id, folder,
    parquet), so that its images can be shown again after the index is loaded."""

    name: str
    dataset: Any
    column: str
    split: str | None = None


def image_files(sources: Sequence) -> tuple:
    """(absolute image files, [(other file, reason)]) of files and folders (searched recursively).

    A folder without a single image is an error, as is a path that does not exist.
    """
    files, others = [], []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found, ignored = find_images(path)
            if not found:
                example = f", e.g. {ignored[0][0].name}" if ignored else ""
                raise ValueError(f"no images in {path}: expected image files of a format Pillow reads, found "
                                 f"{len(ignored)} other files{example}. Give a folder that holds images.")
            files += found
            others += ignored
        elif path.is_file():
            files.append(path)
        elif path.is_symlink():
            raise FileNotFoundError(f"{source} is {link_problem(path)}; expected image files or folders of them")
        else:
            raise FileNotFoundError(f"no such file or folder {source}; expected image files or folders of them")
    return list(dict.fromkeys(path.resolve() for path in files)), others


def describe(entry: dict) -> str:
    """How a gallery entry is named: its file path, or its dataset, split, row and column."""
    if entry.get("path") is not None:
        return entry["path"]
    split = f" [{entry['split']}]" if entry.get("split") else ""
    return f"{entry['dataset']}{split} row {entry['row']} column {entry['column']}"


def _gallery(places: list, hashes: list, vectors: np.ndarray):
    """A `datasets.Dataset` of the gallery: hash, place fields and float16 embedding per image."""
    import datasets
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    values = pa.Array.from_buffers(pa.float16(), vectors.size, [None, pa.py_buffer(vectors.reshape(-1).view(np.uint8))])
    columns = {"hash": pa.array(hashes, pa.string())}
    for name in PLACE_FIELDS:
        columns[name] = pa.array([place.get(name) for place in places], pa.int64() if name == "row" else pa.string())
    columns[EMBEDDING] = pa.FixedSizeListArray.from_arrays(values, vectors.shape[1])
    return datasets.Dataset(pa.table(columns))


def _place_key(place: dict) -> tuple:
    return tuple(place.get(name) for name in PLACE_FIELDS)


# --------------------------------------------------------------------------------------------------
# The index


@dataclass
class SearchResult:
    """The top-k gallery rows of each query group, best first (a row of -1: a slot the index left empty)."""

    queries: list  # per group, the names of its query images
    scores: np.ndarray  # [G, k] cosine similarity
    rows: np.ndarray  # [G, k] gallery rows
    requested_k: int
    skipped: list = field(default_factory=list)  # query images left out, {"image", "reason"}

    @property
    def k(self) -> int:
        return self.rows.shape[1]

    @property
    def clamped(self) -> bool:
        """k was larger than the gallery, so every image is returned."""
        return self.k < self.requested_k


class SearchIndex:
    """A gallery of images embedded by one scorer, searched with FAISS (see the module docstring)."""

    def __init__(self, fingerprint: str, dim: int, scorer: dict | None = None,
                 settings: IndexSettings = IndexSettings(), embedder: Embedder | None = None):
        self.fingerprint, self.dim, self.scorer, self.settings = fingerprint, dim, scorer or {}, settings
        self.embedder = embedder
        self.gallery = _gallery([], [], np.zeros((0, dim), np.float16))
        self.skipped = []  # the images left out when the gallery was last built, {"image", "reason"}
        self.recall = None  # recall@10 of an approximate index against exact search
        self._faiss_file = None  # the saved FAISS index to attach when needed; None: build one
        self._checked_gallery = None  # the gallery whose embeddings were last found finite
        self._datasets = {}  # opened datasets by name, to show their images
        self._loaded = None  # (folder, checksum of its search_index.json) of the saved index this one was loaded from

    @classmethod
    def create(cls, embedder: Embedder, settings: IndexSettings = IndexSettings()) -> "SearchIndex":
        """An empty index for the images `embedder` embeds."""
        scorer = embedder.scorer
        return cls(scorer.fingerprint, scorer.format.shape[0], scorer.provenance(), settings, embedder)

    @classmethod
    def load(cls, folder, embedder: Embedder | None = None) -> "SearchIndex":
        """Open a saved index; with `embedder`, refuse one built by another scorer (naming both fingerprints)."""
        import datasets

        folder = Path(folder)
        info = read_info(folder)
        if embedder is not None:
            check_scorer(info, embedder.scorer, folder)
        index = cls(info["fingerprint"], info["dim"], info["scorer"], IndexSettings(**info["settings"]), embedder)
        check_intact(folder, info)
        index.gallery = datasets.load_from_disk(str(folder / GALLERY_DIR))
        index.skipped, index.recall = info["skipped"], info["recall_at_10"]
        index._faiss_file = folder / FAISS_FILE
        index._loaded = (folder.resolve(), info["checksums"]["info"])
        return index

    def __len__(self) -> int:
        return len(self.gallery)

    # --- the gallery ---

    def vectors(self) -> np.ndarray:
        """[N, D] float16 embeddings, in gallery order."""
        chunks = self.gallery.data.column(EMBEDDING).chunks
        flat = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in chunks]
        return np.concatenate(flat).reshape(-1, self.dim) if flat else np.zeros((0, self.dim), np.float16)

    def finite_vectors(self) -> np.ndarray:
        """`vectors()`, or ValueError naming the images whose embedding is NaN or inf.

        The embed-once store never holds such values, so they mean a damaged gallery; searched or
        clustered, they would silently drop out of the hits and become clusters of their own.
        """
        vectors = self.vectors()
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if len(bad):
            entries = self.entries()
            names = ", ".join(describe(entries[row]) for row in bad[:3])
            raise ValueError(f"the search index's embeddings are not finite (NaN or inf) for {len(bad)} of its "
                             f"{len(self)} images ({names}{', ...' if len(bad) > 3 else ''}): its gallery is "
                             "damaged. Run `python search.py index` on the same images and --index-dir again; "
                             "those images are embedded again.")
        self._checked_gallery = self.gallery
        return vectors

    def entries(self) -> list:
        """Per gallery row: {"hash", "path", "dataset", "split", "row", "column"}."""
        return self.gallery.data.select(["hash", *PLACE_FIELDS]).to_pylist()

    def places(self) -> set:
        """The places (path, or dataset, split, row, column) of the gallery's images."""
        return {_place_key(entry) for entry in self.entries()}

    def image(self, row: int):
        """The image of gallery row `row` as a PIL image, decoded as everywhere else (`load_image`)."""
        entry = self.gallery.data.select(["hash", *PLACE_FIELDS]).slice(row, 1).to_pylist()[0]
        if entry["path"] is not None:
            return load_image(entry["path"])
        key = (entry["dataset"], entry["split"])
        if key not in self._datasets:
            source = DatasetSource.parse(entry["dataset"])
            self._datasets[key] = readers.open_dataset(source, entry["split"] or "train")[0]
        return load_image(readers.image_ref(self._datasets[key], entry["column"], entry["row"]), name=describe(entry))

    def add(self, images: Sequence = (), datasets: Sequence[DatasetColumn] = ()) -> dict:
        """Add image files and folders (recursively) and dataset columns; embeds only content the gallery lacks.

        A file already in the gallery keeps one entry, with its current content. Returns a report
        {"images", "added", "removed", "embedded", "reused", "skipped", "ignored"}.
        """
        return self._update(images, datasets, keep_current=True)

    def sync(self, images: Sequence = (), datasets: Sequence[DatasetColumn] = ()) -> dict:
        """Make the gallery exactly these files, folders and dataset columns: new images are embedded, the
        images no longer listed leave. Returns the report of `add`."""
        return self._update(images, datasets, keep_current=False)

    def _update(self, images, datasets, keep_current: bool) -> dict:
        embedder = self._embedder("add images")
        found = ImageIndex(embedder.options.skip_errors)
        files, ignored = image_files(images)
        places, keys = [{"path": str(path)} for path in files], found.add_files(files)
        absent = []
        for source in datasets:
            self._datasets[(source.name, source.split)] = source.dataset
            column_keys = found.add_column(source.name, source.dataset, source.column)
            for row, key in enumerate(column_keys):
                place = {"dataset": source.name, "split": source.split, "row": row, "column": source.column}
                places.append(place)
                if key is None and f"{source.name} row {row} column {source.column}" not in found.unreadable:
                    absent.append({"image": describe(place), "reason": EMPTY_CELL})
            keys += column_keys
        before = self.places()
        listed = {_place_key(place) for place in places}
        kept = [entry for entry in self.entries() if _place_key(entry) not in listed] if keep_current else []
        report = self._rebuild(found, [*kept, *places], [entry["hash"] for entry in kept] + keys)
        after = self.places()
        report.update(added=len(after - before), removed=len(before - after),
                      ignored=[{"image": str(path), "reason": reason} for path, reason in ignored])
        report["skipped"] += absent
        self.skipped = report["skipped"]
        return report

    def _rebuild(self, found: ImageIndex, places: list, keys: list) -> dict:
        """The gallery becomes `places` (key None: unreadable); known content keeps its embedding."""
        old_vectors = self.vectors()
        finite = np.isfinite(old_vectors).all(axis=1)  # a damaged embedding is computed again, never kept
        known = {key: row for row, key in enumerate(self.gallery.data.column("hash").to_pylist()) if finite[row]}
        new = {key for key in keys if key is not None and key not in known}
        found.retain(new)
        embedded = self.embedder(found) if new else None
        skipped = embedded.skipped if embedded else \
            [{"image": where, "reason": reason} for where, reason in sorted(found.unreadable.items())]
        usable = [i for i, key in enumerate(keys) if key in known or (embedded and key in embedded.vectors)]
        if not usable:  # skipping unreadable images (if asked) has left none: not an ImageLoadError, whose
            # command-line hint is to skip them
            raise ValueError(f"none of the {len(keys)} images could be embedded, so the index would be empty; for "
                             f"example: {skipped[0]['reason'] if skipped else 'no images were given'}")
        vectors = np.empty((len(usable), self.dim), np.float16)
        for out, i in enumerate(usable):
            vectors[out] = old_vectors[known[keys[i]]] if keys[i] in known else embedded.vectors[keys[i]]
        self.gallery = _gallery([places[i] for i in usable], [keys[i] for i in usable], vectors)
        self._faiss_file, self.recall = None, None
        computed = embedded.stats["images_embedded"] if embedded else 0
        return {"images": len(usable), "embedded": computed,
                "from_store": sum(key in embedded.vectors for key in new) - computed if embedded else 0,
                "reused": sum(keys[i] in known for i in usable), "skipped": skipped}

    def _embedder(self, what: str) -> Embedder:
        if self.embedder is None:
            raise ValueError(f"to {what}, the index needs an Embedder (a scorer): SearchIndex.load(folder, embedder)")
        return self.embedder

    def use(self, settings: IndexSettings) -> None:
        """Search with `settings` from now on; the FAISS index is built again when they change."""
        if settings != self.settings:
            if EMBEDDING in self.gallery.list_indexes():
                self.gallery.drop_index(EMBEDDING)
            self.settings, self._faiss_file, self.recall = settings, None, None

    # --- search ---

    def faiss_index(self):
        """The FAISS index over the gallery: the saved one, or built now (with its recall measured)."""
        if EMBEDDING in self.gallery.list_indexes():
            return self.gallery.get_index(EMBEDDING).faiss_index
        if not len(self):
            raise ValueError("the index holds no images; add some first")
        if self._faiss_file is not None:
            self.gallery.load_faiss_index(EMBEDDING, str(self._faiss_file))
            return self.settings.tune(self.gallery.get_index(EMBEDDING).faiss_index)
        index = self.settings.new_index(self.dim, len(self))
        self.gallery.add_faiss_index(EMBEDDING, custom_index=index, train_size=None if index.is_trained else len(self))
        if self.settings.kind != "exact":
            self.recall = recall_against_exact(index, self.vectors())
        return index

    def embed_queries(self, images: Sequence) -> tuple:
        """(names, [Q, D] embeddings, skipped) of query image files and folders, through the embed-once store."""
        embedder = self._embedder("embed query images")
        found = ImageIndex(embedder.options.skip_errors)
        files, ignored = image_files(images)
        keys = found.add_files(files)
        embedded = embedder(found)
        usable = [(str(path), key) for path, key in zip(files, keys) if key in embedded.vectors]
        skipped = embedded.skipped + [{"image": str(path), "reason": reason} for path, reason in ignored]
        if not usable:  # as in `_rebuild`: skipping has left no query, so no hint to skip
            raise ValueError(f"none of the {len(files)} query images could be read, so there is nothing to search; "
                             f"for example: {skipped[0]['reason'] if skipped else 'no images were given'}. Give "
                             "query images that can be read.")
        return [name for name, _ in usable], np.stack([embedded.vectors[key] for _, key in usable]), skipped

    def search(self, queries, k: int = 10, combine: str = "each") -> SearchResult:
        """The top-k gallery images of query images (files, folders) or of embeddings [Q, D].

        combine: "each" searches every query on its own; "mean" searches the mean of their embeddings
        (re-normalised); "max" ranks the gallery by the highest similarity to any query. k larger
        than the gallery returns the whole gallery (`SearchResult.clamped`).
        """
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        if isinstance(queries, np.ndarray):
            names, vectors, skipped = [f"query {i}" for i in range(len(queries))], queries, []
        else:
            names, vectors, skipped = self.embed_queries(queries)
        vectors = self._checked_queries(vectors)
        if self._checked_gallery is not self.gallery:
            self.finite_vectors()
        index, k_used = self.faiss_index(), min(k, len(self))
        if combine == "each":
            scores, rows = index.search(vectors, k_used)
            return SearchResult([[name] for name in names], scores, rows, k, skipped)
        if combine == "mean":
            mean = vectors.mean(0, keepdims=True)
            scores, rows = index.search(mean / max(np.linalg.norm(mean), 1e-12), k_used)
        else:
            scores, rows = _best_of(*index.search(vectors, k_used), k_used)
        return SearchResult([names], scores, rows, k, skipped)

    def _checked_queries(self, vectors) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or not len(vectors):
            raise SearchIndexMismatch(f"query embeddings must be [Q, {self.dim}] (the index's dimension), got "
                                      f"{list(vectors.shape)}; embed the queries with the index's scorer")
        if not np.isfinite(vectors).all():
            raise ValueError("query embeddings hold NaN or inf")
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    # --- clustering ---

    def cluster(self, threshold: float) -> np.ndarray:
        """[N] identity cluster of every gallery image at similarity `threshold` (average linkage);
        cluster 0 is the largest."""
        return IdentityLinkage(self.finite_vectors(), threshold).labels(threshold)

    # --- saving ---

    def save(self, folder, extra: dict | None = None) -> Path:
        """Write the index to `folder` (a staging folder, renamed when complete); `extra` joins search_index.json."""
        folder = Path(folder)
        with one_writer_of(folder):
            check_replaceable(folder)
            self._check_unchanged(folder)
            with replacing_folder(folder) as staging:
                self.faiss_index()
                self.gallery.save_faiss_index(EMBEDDING, str(staging / FAISS_FILE))
                self.gallery.drop_index(EMBEDDING)  # datasets saves no dataset with an index attached
                self._faiss_file = None  # should the save fail from here on, the index is built again when needed
                self.gallery.save_to_disk(str(staging / GALLERY_DIR))
                info = with_checksums(staging, {**self.info(staging), **(extra or {})})
                atomic_write_json(staging / INFO_FILE, info)  # last: complete
        self._faiss_file = folder / FAISS_FILE
        self._loaded = (folder.resolve(), info["checksums"]["info"])
        return folder

    def _check_unchanged(self, folder: Path) -> None:
        """Refuse to replace the index this one was loaded from when another run has saved it since."""
        if self._loaded is None or self._loaded[0] != folder.resolve() or not (folder / INFO_FILE).is_file():
            return
        now = read_json(folder / INFO_FILE, "search index description").get("checksums", {}).get("info")
        if now != self._loaded[1]:
            raise SearchIndexChanged(
                f"the search index in {folder} was saved by another run after this one loaded it; saving now would "
                "drop that run's images, so nothing was saved. Load the index again and add the images to it (the "
                "`search.py index` command does this itself: it waits for the other run).")

    def info(self, folder: Path) -> dict:
        """What search_index.json says about the index saved in `folder`, with the bytes per image stored."""
        gallery_bytes = sum(path.stat().st_size for path in (folder / GALLERY_DIR).rglob("*") if path.is_file())
        return {"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, "dim": self.dim,
                "scorer": self.scorer, "settings": vars(self.settings), "images": len(self),
                "recall_at_10": self.recall,
                "bytes_per_image": {"faiss_index": (folder / FAISS_FILE).stat().st_size / len(self),
                                    "gallery": gallery_bytes / len(self)},
                "skipped": self.skipped}


def thumbnail(image, size: int = 128) -> np.ndarray:
    """A PIL image as an [H, W, 3] uint8 array whose longer side is at most `size`, for contact sheets."""
    image = image.copy()
    image.thumbnail((size, size))
    return np.asarray(image)


def _best_of(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple:
    """Merge per-query top-k lists [Q, k] into one ([1, k], [1, k]) by each row's best score.

    Exact: an image in the top k by its best score is in the top k of the query that gives it that score.
    """
    scores, rows = scores.ravel(), rows.ravel()
    scores, rows = scores[rows >= 0], rows[rows >= 0]
    order = np.lexsort((rows, -scores))
    _, first = np.unique(rows[order], return_index=True)
    best = order[np.sort(first)][:k]
    pad = k - len(best)
    return (np.concatenate([scores[best], np.full(pad, -np.inf, np.float32)])[None],
            np.concatenate([rows[best], np.full(pad, -1)])[None])


def read_info(folder: Path) -> dict:
    """search_index.json of the index in `folder`; a clear error when there is none."""
    path = folder / INFO_FILE
    if not path.is_file():
        aside = set_aside_path(folder)
        hint = f" An earlier save was interrupted: the previous index is in {aside}; rename it back." \
            if aside.is_dir() else ""
        raise FileNotFoundError(f"no search index in {folder} ({INFO_FILE} is missing). Build one with `python "
                                f"search.py index --images DIR --index-dir {folder}`.{hint}")
    info = read_json(path, "search index description")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"the search index in {folder} has format version {info.get('format_version')}; this code "
                         f"reads version {FORMAT_VERSION}. {rebuild_hint(folder)}")
    return info


def rebuild_hint(folder: Path) -> str:
    return (f"Build it again: python search.py index --index-dir {folder} --overwrite with the same --images or "
            f"--dataset as before (listed in {folder / 'index_args.json'}).")


def with_checksums(folder: Path, info: dict) -> dict:
    """`info` with the checksums of the index files in `folder` and of `info` itself (`nearid.integrity`)."""
    files = {**manifest(folder, [FAISS_FILE]), **manifest_of_tree(folder, GALLERY_DIR)}
    info = {**info, "checksums": {"algorithm": ALGORITHM, "files": files}}
    info["checksums"]["info"] = checksum_json(info)
    return info


def check_intact(folder: Path, info: dict) -> None:
    """SearchIndexDamaged, naming what differs and what to run, unless every file of the index in `folder`
    is as it was saved: search_index.json (e.g. an edited dim), faiss.index and the gallery."""
    recorded = info.get("checksums") or {}
    unsigned = {**info, "checksums": {k: v for k, v in recorded.items() if k != "info"}}
    if recorded.get("algorithm") != ALGORITHM or recorded.get("info") != checksum_json(unsigned):
        raise SearchIndexDamaged(f"{folder / INFO_FILE} differs from what was saved (it was edited or damaged), so "
                                 f"the index cannot be trusted. {rebuild_hint(folder)}")
    problems = damaged(folder, recorded["files"])
    if problems:
        listed = "; ".join(f"{name} {problem}" for name, problem in sorted(problems.items()))
        raise SearchIndexDamaged(f"the search index in {folder} is damaged: {listed}. {rebuild_hint(folder)}")


def lock_file(folder: Path) -> Path:
    # Beside the folder, not in it: a save replaces the folder as a whole.
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def one_writer_of(folder, state=None):
    """Hold the lock of the index in `folder` for the block: the main process takes it for all processes of
    its run (`state`, accelerate's PartialState, None for this process alone); others wait, saying who holds it.
    The holder first puts back an index that a killed save left set aside (`recover_folder`)."""
    folder = Path(folder)
    with ExitStack() as stack:
        if state is None or state.is_main_process:
            stack.enter_context(one_writer(lock_file(folder), f"the search index in {folder}"))
            recover_folder(folder)
        if state is not None:
            state.wait_for_everyone()  # no process loads the index before its run holds the lock
        yield


def check_replaceable(folder: Path) -> None:
    """Refuse to replace a folder that holds something other than a search index."""
    if folder.exists() and not (folder / INFO_FILE).is_file() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not a search index (it has no {INFO_FILE}), so it is not "
                              "replaced; give a new or empty folder, or an existing index")


def check_scorer(info: dict, scorer, folder) -> None:
    """Refuse a scorer other than the index's: their similarities cannot be compared."""
    if info["fingerprint"] != scorer.fingerprint:
        raise SearchIndexMismatch(
            f"the index in {folder} was built with {info['scorer'].get('spec')} (fingerprint {info['fingerprint']}, "
            f"{info['dim']}-d), but this run embeds with {scorer.spec} (fingerprint {scorer.fingerprint}, "
            f"{scorer.format.shape[0]}-d): the model weights, preprocessing or dimension differ, so their "
            "similarities cannot be compared. Use the index's model, or build a new index with this one.")
