"""NearID in the browser: score generations against references, compare two images, search an index.

    python space/app.py --model demo_outputs/training/release                 # a NearID model folder, or a Hub id
    python space/app.py --model Aleksandar/nearid-siglip2 --index my_index --port 7860

On a Hugging Face Space the same file is the app; the model comes from the NEARID_MODEL variable
(default Aleksandar/nearid-siglip2) and an index, when wanted, from NEARID_INDEX. The model is loaded
with NearID's own classes through `nearid.IdentityScorer`; the model folder's code is never run.

Views:
- Score: reference and generated images -> each generation's identity score (cosine similarity,
  mean over the references), a ranked table, and heatmaps (docs/method.md, "Seeing identity").
- Compare: two images -> their similarity and both images' maps.
- Search: a query image -> the top hits of a search index (`search.py index`) with their scores.
Uploads that are not images, empty or too large get a message in the page; the server goes on.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# From a checkout the package is one folder up; on a Space it is pushed beside this file.
for root in (HERE, HERE.parent):
    if (root / "nearid" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
        break

from nearid.cli import collector_paused, freeze_heavy_imports  # noqa: E402

freeze_heavy_imports()  # the app is this process's program: what its imports make is frozen (nearid.cli)
with collector_paused(freeze=True):  # gradio, torch and transformers: seconds less to start
    import gradio as gr

    from nearid import heatmaps
    from nearid.api import DEFAULT_MODEL, IdentityScorer
    from nearid.images import ImageLoadError, load_image

MAX_UPLOAD_MB = 20
MAX_IMAGES = 16  # per box of the Score view: each image runs the backbone on this machine
TABLE_COLUMNS = ["rank", "generated image", "score", "best reference", "max score", "attention-stage cos"]


class UploadError(ValueError):
    """An upload the app cannot use; its message is shown in the page."""


def check_upload(path, what: str) -> str:
    """The path of a usable uploaded image, or UploadError saying what is wrong and what to do."""
    if path is None:
        raise UploadError(f"No {what} was given: drop an image file (PNG, JPEG, WebP, ...) into its box.")
    path = Path(getattr(path, "name", path))
    size = path.stat().st_size
    if size == 0:
        raise UploadError(f"The {what} '{path.name}' is an empty file (0 bytes); upload the image again.")
    if size > MAX_UPLOAD_MB * 2**20:
        raise UploadError(f"The {what} '{path.name}' is {size / 2**20:.1f} MB; at most {MAX_UPLOAD_MB} MB per image "
                          "is accepted. Resize or compress it, then upload it again.")
    try:
        load_image(str(path))
    except ImageLoadError as error:
        raise UploadError(f"The {what} '{path.name}' could not be read as an image ({error}). Upload a PNG, JPEG "
                          "or WebP file.") from None
    return str(path)


def check_uploads(paths, what: str) -> list:
    paths = [p for p in (paths or []) if p is not None]
    if not paths:
        raise UploadError(f"No {what}s were given: drop one or more image files into the box.")
    if len(paths) > MAX_IMAGES:
        raise UploadError(f"{len(paths)} {what}s were given; this app scores at most {MAX_IMAGES} at a time.")
    return [check_upload(p, what) for p in paths]


def _name(path: str) -> str:
    return Path(path).name


class NearIDApp:
    """The views' functions, on one loaded model (and optionally a search index): plain Python, testable
    without a browser. Each returns its outputs and a message; a bad upload is a message, never a crash."""

    def __init__(self, model: str, index_dir: str | None = None, revision: str | None = None):
        self.scorer = IdentityScorer(model, revision=revision)
        self.model = model
        self.index, self.index_problem = None, None
        if index_dir:
            self.index, self.index_problem = self._load_index(index_dir)

    def _load_index(self, index_dir):
        from nearid.search import Embedder, SearchIndex

        try:
            embedder = Embedder(self.scorer.scorer, self.scorer.cache_dir, self.scorer.options)
            return SearchIndex.load(index_dir, embedder), None
        except Exception as error:  # the other views still work; the Search view says why it cannot
            return None, f"The search index {index_dir} could not be opened: {error}"

    def score(self, references, generated):
        """(message, mean score of the top-ranked image, table rows, heatmap gallery)."""
        try:
            refs = check_uploads(references, "reference image")
            gens = check_uploads(generated, "generated image")
            maps = self.scorer.heatmaps(refs, gens)
        except UploadError as error:
            return f"**{error}**", None, [], []
        except Exception as error:  # shown in the page: the server goes on serving
            return f"**Scoring failed: {type(error).__name__}: {error}**", None, [], []
        means, maxes = maps.scores.mean(axis=1), maps.scores.max(axis=1)
        order = sorted(range(len(gens)), key=lambda g: -means[g])
        rows = [[rank, _name(gens[g]), round(float(means[g]), 6), _name(refs[int(maps.scores[g].argmax())]),
                 round(float(maxes[g]), 6), round(float(maps.attention_cosine[g]), 6)]
                for rank, g in enumerate(order, start=1)]
        gallery = []
        for g in order:
            picture = load_image(gens[g])
            gallery.append((heatmaps.overlay(picture, maps.attention[g]),
                            f"{_name(gens[g])}: attention (score {means[g]:.4f})"))
            gallery.append((heatmaps.overlay(picture, maps.correspondence[g], signed=True),
                            f"{_name(gens[g])}: correspondence to the references"))
        message = (f"Scored {len(gens)} generated image(s) against {len(refs)} reference(s). Score: cosine "
                   f"similarity of the NearID embeddings, mean over the references. Heatmaps: attention, where "
                   f"the embedding looks; {heatmaps.CORRESPONDENCE_CAPTION}; red adds to it, blue takes away.")
        return message, float(means[order[0]]), rows, gallery

    def compare(self, first, second):
        """(message, similarity, gallery of both images' attention and correspondence maps)."""
        try:
            a, b = check_upload(first, "first image"), check_upload(second, "second image")
            forward = self.scorer.heatmaps(a, b)  # b against a
            backward = self.scorer.heatmaps(b, a)  # a against b
        except UploadError as error:
            return f"**{error}**", None, []
        except Exception as error:
            return f"**Comparing failed: {type(error).__name__}: {error}**", None, []
        picture_a, picture_b = load_image(a), load_image(b)
        gallery = [(heatmaps.overlay(picture_a, backward.attention[0]), f"{_name(a)}: attention"),
                   (heatmaps.overlay(picture_b, forward.attention[0]), f"{_name(b)}: attention"),
                   (heatmaps.overlay(picture_a, backward.correspondence[0], signed=True),
                    f"{_name(a)}: correspondence to {_name(b)}"),
                   (heatmaps.overlay(picture_b, forward.correspondence[0], signed=True),
                    f"{_name(b)}: correspondence to {_name(a)}")]
        similarity = float(forward.scores[0, 0])
        message = (f"Identity similarity (cosine of the NearID embeddings): {similarity:.4f}. "
                   f"{heatmaps.CORRESPONDENCE_CAPTION}.")
        return message, similarity, gallery

    def search(self, query, k):
        """(message, gallery of the top-k hits with their scores)."""
        if self.index is None:
            problem = self.index_problem or "No search index: start the app with --index DIR (search.py index)."
            return f"**{problem}**", []
        try:
            path = check_upload(query, "query image")
            result = self.index.search([path], int(k), "each")
        except UploadError as error:
            return f"**{error}**", []
        except Exception as error:
            return f"**Searching failed: {type(error).__name__}: {error}**", []
        from nearid.search import describe, thumbnail

        entries = self.index.entries()
        hits = [(thumbnail(self.index.image(int(row)), 256), f"#{rank} {score:.4f} {Path(describe(entries[row])).name}")
                for rank, (score, row) in enumerate(zip(result.scores[0], result.rows[0]), start=1) if row >= 0]
        return f"Top {len(hits)} of {len(self.index)} gallery images by identity similarity.", hits


def build_app(app: NearIDApp) -> gr.Blocks:
    with gr.Blocks(title="NearID") as demo:
        gr.Markdown(f"# NearID: identity similarity\nModel: `{app.model}`. Scores are cosine similarities of "
                    "NearID identity embeddings; heatmaps show where the embedding looks (docs/method.md).")
        with gr.Tab("Score"):
            with gr.Row():
                references = gr.File(label="Reference images", file_count="multiple", elem_id="score-references")
                generated = gr.File(label="Generated images", file_count="multiple", elem_id="score-generated")
            score_button = gr.Button("Score", variant="primary", elem_id="score-button")
            score_message = gr.Markdown(elem_id="score-message")
            score_value = gr.Number(label="Score of the top-ranked generation", elem_id="score-value")
            score_table = gr.Dataframe(headers=TABLE_COLUMNS, label="Ranking", elem_id="score-table")
            score_gallery = gr.Gallery(label="Heatmaps", columns=4, elem_id="score-heatmaps")
            score_button.click(app.score, [references, generated],
                               [score_message, score_value, score_table, score_gallery], api_name="score")
        with gr.Tab("Compare"):
            with gr.Row():
                first = gr.File(label="First image", elem_id="compare-first")
                second = gr.File(label="Second image", elem_id="compare-second")
            compare_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
            compare_message = gr.Markdown(elem_id="compare-message")
            compare_value = gr.Number(label="Similarity", elem_id="compare-value")
            compare_gallery = gr.Gallery(label="Maps", columns=4, elem_id="compare-heatmaps")
            compare_button.click(app.compare, [first, second], [compare_message, compare_value, compare_gallery],
                                 api_name="compare")
        with gr.Tab("Search"):
            if app.index is None:
                gr.Markdown(app.index_problem or "No search index is loaded: start the app with `--index DIR` "
                            "(a folder written by `search.py index`).")
            query = gr.File(label="Query image", elem_id="search-query")
            k = gr.Slider(1, 50, value=10, step=1, label="Top k", elem_id="search-k")
            search_button = gr.Button("Search", variant="primary", elem_id="search-button")
            search_message = gr.Markdown(elem_id="search-message")
            search_gallery = gr.Gallery(label="Top hits", columns=5, elem_id="search-hits")
            search_button.click(app.search, [query, k], [search_message, search_gallery], api_name="search")
    return demo


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("NEARID_MODEL", DEFAULT_MODEL),
                        help="NearID model folder or Hub id (default: $NEARID_MODEL or %(default)s)")
    parser.add_argument("--revision", default=None, help="Hub revision to pin (branch, tag or commit)")
    parser.add_argument("--index", default=os.environ.get("NEARID_INDEX"),
                        help="a search index folder (search.py index) for the Search view")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 to share on a network)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)), help="port to serve on")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        app = NearIDApp(args.model, args.index, args.revision)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    build_app(app).launch(server_name=args.host, server_port=args.port, max_file_size=f"{MAX_UPLOAD_MB}mb",
                          show_error=True)


if __name__ == "__main__":
    main()
