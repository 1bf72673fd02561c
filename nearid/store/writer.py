"""The fill's last stage: encoded rows checked, converted to the storage format and written as shards.

`ShardWriter` writes the rows of one process as shards of `shard_size` rows, each under a
temporary name, fsynced, then renamed to the name that carries its checksum: an interruption
keeps every finished shard and never leaves a partial one under a shard's name.
`BackgroundWriter` runs it in a thread beside the encoder, so a fill takes the longer of its
forwards and its writes, not their sum.
"""

from __future__ import annotations

import io
import os
import queue
import secrets
import threading
from pathlib import Path

import numpy as np
import torch

from nearid.integrity import new_checksum
from nearid.store.format import StoreFormat, finite_rows
from nearid.store.layout import next_shard_number, shard_stem


class BackgroundWriter:
    """A `ShardWriter` in a thread of its own, fed through a bounded queue of computed batches.

    The forward of the next batch runs while this one is converted, checked and written. The queue
    is bounded, so memory stays bounded when the disk is the slower side. It holds `queue_bytes` of
    batches (at least `min_depth`), so that writes slower than usual for a while (a busy disk, a
    shard's fsync) do not stop the forward: when the forward and the writes take the same time on
    average, a forward stopped by a full queue is time the fill never wins back
    (benchmarks/bench_fill_overlap.py). The price is host memory: so400m tokens at batch 256 are
    0.86 GB of float32 per batch. An error of the writer (non-finite values, a full disk) is raised
    in the filling thread at its next `add` or at `close`; batches queued after it are not written,
    those before it are.
    """

    def __init__(self, writer: "ShardWriter", queue_bytes: int = 2 * 2**30, min_depth: int = 4):
        self.writer, self.error, self.raised = writer, None, False
        self.queue_bytes, self.min_depth = queue_bytes, min_depth
        self.queue = self.thread = None  # sized by the first batch

    def add(self, keys: list, values: torch.Tensor) -> None:
        self._raise()
        if self.queue is None:
            self.queue = queue.Queue(maxsize=max(self.min_depth, self.queue_bytes // max(1, values.nbytes)))
            self.thread = threading.Thread(target=self._run, name="nearid-shard-writer", daemon=True)
            self.thread.start()
        event = None
        if values.device.type == "cuda":  # copied to pinned memory without blocking; the thread waits for it
            values = values.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.queue.put((keys, values, event))

    def close(self) -> None:
        """Write every queued batch and the last, partial shard; raise the writer's error if it had one."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
        self.writer.flush()
        self._raise()

    def _run(self) -> None:
        with torch.inference_mode():
            while (item := self.queue.get()) is not None:
                if self.error is not None:
                    continue  # drain, so the filling thread never waits on a full queue
                keys, values, event = item
                try:
                    if event is not None:
                        event.synchronize()
                    self.writer.add(keys, values)
                except BaseException as error:  # handed to the filling thread
                    self.error = error

    def _raise(self) -> None:
        if self.error is not None and not self.raised:
            self.raised = True  # once: `close` after the error's own exception adds nothing
            raise self.error


class ShardWriter:
    """Writes the encoded rows of one process into shards of `shard_size` rows, each batch as it arrives.

    Rows go to the open shard's file at once, rather than into a shard-sized buffer written when
    full, so every batch costs the same write time (no shard-sized stall after every few batches)
    and host memory holds one batch, not one shard. `written` lists each finished shard as the index
    records it: its file, keys, size and modification time.
    """

    def __init__(self, folder: Path, fmt: StoreFormat, process_index: int, shard_size: int, keys: list):
        self.folder, self.format, self.process_index, self.shard_size = folder, fmt, process_index, shard_size
        # A new shard never takes the name of one on disk; the index recognises a reused name by its size
        # and modification time.
        self.next_number = next_shard_number(folder, process_index)
        self.records = fmt.record_dtype(max((len(key.encode("utf-8")) for key in keys), default=1))
        self.unwritten = len(keys)  # an upper bound of the rows still to come
        self.shard, self.written = None, []

    def add(self, keys: list, values: torch.Tensor) -> None:
        fields = self.format.encode(values)
        check_finite(keys, fields, self.format.dtype)
        rows = np.empty(len(keys), self.records)
        rows["key"] = [key.encode("utf-8") for key in keys]
        for name, column in fields.items():
            rows[name] = column
        start = 0
        while start < len(rows):
            if self.shard is None:
                capacity = max(1, min(self.shard_size, self.unwritten))
                self.shard = OpenShard(self.folder, shard_stem(self.process_index, self.next_number), self.records,
                                       capacity)
            end = start + min(self.shard.room, len(rows) - start)
            self.shard.write(rows[start:end], keys[start:end])
            self.unwritten -= end - start
            start = end
            if not self.shard.room:
                self.flush()

    def flush(self) -> None:
        """Finish the open shard (fsync, rename to the name with its checksum), if it holds any row."""
        if self.shard is not None:
            shard, self.shard = self.shard, None
            if shard.keys:
                self.written.append(shard.finish())
                self.next_number += 1
            else:
                shard.discard()


class OpenShard:
    """One shard being written: a temporary file holding the .npy header for `capacity` rows, then rows.

    Its checksum is taken from the bytes as they are written, so finishing it reads nothing back.
    A shard that ends with fewer rows (an interrupted fill, or images left out) is rewritten with the
    header of the rows it holds. Rows written are on disk by `finish` (fsync, then the rename that
    makes the shard visible), and synced every `SYNC_BYTES` on the way, so the disk writes them
    evenly rather than all at the fsync.
    """

    SYNC_BYTES = 16 * 2**20

    def __init__(self, folder: Path, stem: str, records: np.dtype, capacity: int):
        self.folder, self.stem, self.records, self.capacity = folder, stem, records, capacity
        self.temp = self._new_temp()
        self.stream = open(self.temp, "xb")  # noqa: SIM115 (closed by finish or discard)
        self.header = npy_header(records, capacity)
        self.checksum, self.keys, self.unsynced = new_checksum(), [], 0
        self._write(self.header)

    @property
    def room(self) -> int:
        return self.capacity - len(self.keys)

    def write(self, rows: np.ndarray, keys: list) -> None:
        """Append `rows` (at most `room`) of `keys`."""
        self._write(memoryview(np.ascontiguousarray(rows).view(np.uint8)))
        self.stream.flush()  # handed to the OS batch by batch, so the disk can work through them as they come
        self.keys += keys  # only after the write: a failed write never counts its rows
        if self.unsynced >= self.SYNC_BYTES:
            os.fdatasync(self.stream.fileno())
            self.unsynced = 0

    def _write(self, data) -> None:
        self.stream.write(data)
        self.checksum.update(data)
        self.unsynced += len(data)

    def finish(self) -> dict:
        """Make the shard durable and visible under its checksum name; returns its index entry."""
        try:
            if len(self.keys) < self.capacity:
                self._rewrite_for_rows_written()
            self.stream.flush()
            os.fsync(self.stream.fileno())
            self.stream.close()
            path = self.folder / f"{self.stem}-{self.checksum.hexdigest()}.npy"
            os.replace(self.temp, path)
        finally:
            self.discard()
        return {"file": path.name, "keys": self.keys, "bytes": path.stat().st_size,
                "mtime_ns": path.stat().st_mtime_ns}

    def discard(self) -> None:
        self.stream.close()
        self.temp.unlink(missing_ok=True)

    def _new_temp(self) -> Path:
        """A temporary name no other writer takes; a later fill drops it as a leftover (`.*.tmp`)."""
        return self.folder / f".{self.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp"

    def _rewrite_for_rows_written(self) -> None:
        """Copy the rows written into a new temporary file under the header of their count (rare: a short shard)."""
        self.stream.flush()
        old, rows_start = self.temp, len(self.header)
        self.stream.close()
        self.temp = self._new_temp()
        self.stream, self.checksum = open(self.temp, "xb"), new_checksum()  # noqa: SIM115
        try:
            self.header = npy_header(self.records, len(self.keys))
            self._write(self.header)
            with open(old, "rb") as source:
                source.seek(rows_start)
                remaining = len(self.keys) * self.records.itemsize  # a row half-written when interrupted is left
                while remaining:
                    chunk = source.read(min(remaining, 64 * 2**20))
                    if not chunk:
                        raise OSError(f"{old} lost rows while a shard was being finished")
                    self._write(chunk)
                    remaining -= len(chunk)
        finally:
            old.unlink(missing_ok=True)


def npy_header(records: np.dtype, rows: int) -> bytes:
    """The .npy header `np.save` writes for `rows` records of `records`."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(records),
                                                  "fortran_order": False, "shape": (rows,)})
    return header.getvalue()


def check_finite(keys, fields: dict, dtype: str):
    """Refuse values that would be stored as NaN/inf (float16 overflow, or a model producing NaN)."""
    stored = fields["scale"] if dtype == "int8" else fields["values"]  # a NaN vector has a NaN scale
    finite = finite_rows(torch.from_numpy(stored)).numpy()
    if not finite.all():
        bad = [key for key, ok in zip(keys, finite, strict=True) if not ok]
        raise FloatingPointError(
            f"values of {bad[:5]} are not finite when stored as {dtype} (NaN or inf from the model, or beyond the "
            "float16 range of +-65504). Check the model and its inputs, or store float32; nothing of them was kept.")
