"""Several processes give a single process's results: evaluate.py and embed_missing under torchrun.

Runs go through `python -m torch.distributed.run` on the CPU (gloo), the launcher `accelerate
launch` itself uses for several processes (`accelerate launch --cpu` starts one process: accelerate
leaves multi-process CPU runs to MPI). Each run is judged by the files its processes write, not by
its exit code alone: CPU process groups sometimes abort at exit after all the work is done.

This file is also the worker script of the embed_missing test (`share_worker`, `__main__` block).
"""

import io
import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from tests.helpers import REPO_ROOT, launch, make_tiny_nearid, make_tiny_processor, run_isolated
from PIL import Image

from nearid import data
import nearid.synthetic
from nearid.embedding import EmbeddingCache, embed_missing
from nearid.hub import export_hub_folder

RESULTS = "nearid_results.json"
TABLE_HEADER = "| source | SSR | PA |"


def cache_shards(cache_dir):
    return sorted(Path(cache_dir).glob("*/shard-*.npz"))


# --- evaluate.py nearid ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """Synthetic positives and two sources, one image of `sdxl` corrupt; a tiny exported model with
    its remote code already in the module cache `<root>/hf_modules`; and the corrupt image's row."""
    root = tmp_path_factory.mktemp("benchmark")
    nearid.synthetic.main(["--output-dir", str(root), "--num-identities", "10", "--missing-distractor-rate", "0.2"])
    sdxl = data.undecoded(datasets.load_from_disk(str(root / "sdxl")), ["nimg1"])
    present = [r for r, ref in enumerate(data.image_refs(sdxl, "nimg1", range(len(sdxl)))) if ref]
    broken_row = present[len(present) // 2]
    garbage = {"bytes": b"not an image", "path": None}
    sdxl = sdxl.map(lambda e, i: {"nimg1": garbage if i == broken_row else e["nimg1"]}, with_indices=True)
    sdxl.cast_column("nimg1", datasets.Image()).save_to_disk(str(root / "sdxl_broken"))
    model = export_hub_folder(make_tiny_nearid(), make_tiny_processor(), root / "model")
    run_isolated(f"from transformers import AutoModel; AutoModel.from_pretrained({str(model)!r}, "
                 "trust_remote_code=True)", root)
    return root, model, broken_row


def launch_evaluate(num_processes, benchmark, tmp_path, out, cache, *extra):
    root, model, _ = benchmark
    args = [REPO_ROOT / "evaluate.py", "nearid", "--model", model, "--positives", root / "positives",
            "--source", f"flux={root / 'flux'}", "--source", f"sdxl={root / 'sdxl_broken'}",
            "--device", "cpu", "--batch-size", "4", "--output-dir", out, "--cache-dir", cache, *extra]
    return launch(num_processes, args, tmp_path, f"{out.name}.log", modules_cache=root / "hf_modules")


def test_two_processes_write_the_results_of_one(benchmark, tmp_path):
    outputs = {}
    for processes in (1, 2):
        out, cache = tmp_path / f"out{processes}", tmp_path / f"cache{processes}"
        code, output = launch_evaluate(processes, benchmark, tmp_path, out, cache, "--skip-bad-images")
        assert (out / RESULTS).is_file(), f"{processes} process(es), exit code {code}:\n{output[-4000:]}"
        outputs[processes] = (out, cache, output)

    (one, one_cache, _), (two, two_cache, two_output) = outputs[1], outputs[2]
    broken_row = benchmark[2]
    first, second = (json.loads((o / RESULTS).read_text()) for o in (one, two))
    assert second["metrics"] == first["metrics"]  # bit-identical, not merely close
    assert second["counts"] == first["counts"]
    assert second["skipped"] == first["skipped"]
    assert [s["image"] for s in second["skipped"]] == [f"source sdxl row {broken_row} column nimg1"]
    for name in ("nearid_per_sample.csv", "nearid_table.md"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name

    # Each image was embedded once in all, and the processes acted as one run: one report, one cache
    # writer. (That each process embedded only its share is checked on embed_missing below.)
    stats, stats_one = second["provenance"]["extra"]["embedding"], first["provenance"]["extra"]["embedding"]
    assert stats == stats_one
    assert stats["images_embedded"] == stats["unique_images"] - 1  # all but the corrupt one
    assert two_output.count(TABLE_HEADER) == 1  # only the main process reports
    shards = cache_shards(two_cache)
    assert len(shards) == 1  # only the main process writes the cache, once
    with np.load(shards[0]) as shard:
        assert len(set(shard["keys"].tolist())) == len(shard["keys"]) == stats["images_embedded"]
    assert len(cache_shards(one_cache)) == 1


def test_corrupt_image_stops_every_process_with_its_location(benchmark, tmp_path):
    out, (_, _, broken_row) = tmp_path / "out", benchmark
    code, output = launch_evaluate(2, benchmark, tmp_path, out, tmp_path / "cache")  # no --skip-bad-images
    assert code != 0
    assert f"ImageReadError: cannot decode image at source sdxl row {broken_row} column nimg1" in output
    assert not (out / RESULTS).exists()


# --- embed_missing ---------------------------------------------------------------------------------


def png(index):
    buffer = io.BytesIO()
    Image.new("RGB", (6, 5), (20 * index, 255 - 15 * index, (70 * index) % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = {f"image{index:02d}": png(index) for index in range(11)}
IMAGES["a_broken_one"] = b"not an image"
LATE_IMAGE = ("image99", png(99))  # embedded on its own afterwards: one batch for two processes
BATCH_SIZE = 3


class PixelScorer:
    """A stand-in scorer: the normalised pixels of a 2x2 thumbnail, with the real scorer's counters."""

    kind_name = "pixels"

    def __init__(self):
        self.forward_passes = self.images_embedded = 0

    def preprocess(self, image):
        return torch.tensor(np.asarray(image.resize((2, 2))), dtype=torch.float32).flatten()

    def embed(self, pixels):
        self.forward_passes += 1
        self.images_embedded += len(pixels)
        return torch.nn.functional.normalize(pixels, dim=-1)


class RecordingDecoder:
    """Decodes (key, bytes) refs, remembering the keys this process decoded."""

    def __init__(self):
        self.keys = []

    def __call__(self, ref):
        key, data = ref
        self.keys.append(key)
        try:
            return Image.open(io.BytesIO(data)).convert("RGB")
        except OSError as error:
            raise ValueError(f"cannot decode {key}: {error}") from error


def embed_images(state, cache_dir):
    """Embed IMAGES then LATE_IMAGE; what this process did and ended with, as JSON-ready values."""
    scorer, decode = PixelScorer(), RecordingDecoder()
    cache = EmbeddingCache(cache_dir, "pixels")
    refs = {key: (key, data) for key, data in IMAGES.items()}
    skipped = embed_missing(scorer, refs, cache, decode, batch_size=BATCH_SIZE, skip_errors=True,
                            state=state, progress=False)
    late = embed_missing(scorer, {LATE_IMAGE[0]: LATE_IMAGE}, cache, decode, batch_size=BATCH_SIZE,
                         state=state, progress=False)
    keys = sorted(list(IMAGES) + [LATE_IMAGE[0]])
    return {"decoded": decode.keys, "skipped": skipped, "late_skipped": late,
            "table": {k: cache.get(k).tolist() for k in keys if k in cache},
            "forward_passes": scorer.forward_passes, "images_embedded": scorer.images_embedded}


def share_worker(out_dir):
    """Under torchrun: embed_images on this process's share, written to `<out_dir>/rank<N>.json`."""
    from accelerate import PartialState

    state = PartialState(cpu=True)
    if state.num_processes < 2:
        raise SystemExit(f"expected several processes, accelerate sees {state.num_processes}")
    record = embed_images(state, Path(out_dir) / "cache")
    (Path(out_dir) / f"rank{state.process_index}.json").write_text(json.dumps(record))


def test_embed_missing_shares_the_images_and_gathers_everything(tmp_path):
    code, output = launch(2, [Path(__file__), tmp_path], tmp_path, "worker.log")
    records = [tmp_path / f"rank{rank}.json" for rank in (0, 1)]
    assert all(r.is_file() for r in records), f"exit code {code}:\n{output[-4000:]}"
    main, other = (json.loads(r.read_text()) for r in records)
    single = json.loads(json.dumps(embed_images(None, tmp_path / "single_cache")))

    # Every image, the broken one included, was decoded by exactly one process.
    assert main["decoded"] and other["decoded"]
    assert not set(main["decoded"]) & set(other["decoded"])
    assert sorted(main["decoded"] + other["decoded"]) == sorted(single["decoded"])
    # Every process ends with everything a single process has: embeddings, skipped images, counters.
    for record in (main, other):
        assert record["table"] == single["table"]
        assert record["skipped"].keys() == single["skipped"].keys() == {"a_broken_one"}
        assert record["late_skipped"] == {}
        assert (record["forward_passes"], record["images_embedded"]) == (single["forward_passes"],
                                                                          single["images_embedded"])
    assert single["images_embedded"] == (len(IMAGES) - 1) + 1  # the good images, then the late one
    # The main process alone persisted the cache: one shard per call that embedded something.
    shards = cache_shards(tmp_path / "cache")
    assert len(shards) == 2
    assert len(EmbeddingCache(tmp_path / "cache", "pixels")) == len(single["table"])


if __name__ == "__main__":
    share_worker(sys.argv[1])
