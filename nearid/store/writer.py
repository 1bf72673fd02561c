"""The fill's last stage: encoded rows checked, converted to the storage format and written as shards.

`ShardWriter` writes the rows of one process as shards of `shard_size` rows, each under a
temporary name, fsynced, then renamed to the name that carries its checksum: an interruption
keeps every finished shard and never leaves a partial one under a shard's name.
`BackgroundWriter` runs it in a thread beside the encoder, so a fill takes the longer of its
forwards and its writes, not their sum.
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
from pathlib import Path

import numpy as np
import torch

from nearid.integrity import checksum_file
from nearid.store.format import StoreFormat
from nearid.store.layout import next_shard_number, shard_stem


class BackgroundWriter:
    """A `ShardWriter` in a thread of its own, fed through a queue of at most `depth` computed batches.

    The forward of the next batch runs while this one is converted, checked and written. The queue
    is bounded, so memory stays bounded when the disk is the slower side; it holds `depth` batches
    because writing a full shard takes a few batches' time (benchmarks/bench_fill_overlap.py), and
    the forward goes on meanwhile. The price is host memory: so400m tokens at batch 256 are 0.86 GB
    of float32 per batch. An error of the writer
    (non-finite values, a full disk) is raised in the filling thread at its next `add` or at
    `close`; batches queued after it are not written, those before it are.
    """

    def __init__(self, writer: "ShardWriter", depth: int = 4):
        self.writer, self.error, self.raised = writer, None, False
        self.queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name="nearid-shard-writer", daemon=True)
        self.thread.start()

    def add(self, keys: list, values: torch.Tensor) -> None:
        self._raise()
        event = None
        if values.device.type == "cuda":  # copied to pinned memory without blocking; the thread waits for it
            values = values.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.queue.put((keys, values, event))

    def close(self) -> None:
        """Write every queued batch and the last, partial shard; raise the writer's error if it had one."""
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
    """Collects encoded rows of one process into a shard-sized buffer and writes it when full."""

    def __init__(self, folder: Path, fmt: StoreFormat, process_index: int, shard_size: int, keys: list):
        self.folder, self.format, self.process_index, self.shard_size = folder, fmt, process_index, shard_size
        # A new shard never takes the name of one on disk; the index recognises a reused name by its size
        # and modification time.
        self.next_number = next_shard_number(folder, process_index)
        self.key_bytes = max((len(key.encode("utf-8")) for key in keys), default=1)
        self.unwritten = len(keys)  # an upper bound of the rows still to come
        self.buffer, self.filled = None, 0

    def add(self, keys: list, values: torch.Tensor):
        fields = self.format.encode(values)
        check_finite(keys, fields, self.format.dtype)
        fields["key"] = np.array([key.encode("utf-8") for key in keys], dtype=f"S{self.key_bytes}")
        start = 0
        while start < len(keys):
            if self.buffer is None:
                capacity = max(1, min(self.shard_size, self.unwritten))
                self.buffer, self.filled = np.empty(capacity, dtype=self.format.record_dtype(self.key_bytes)), 0
            count = min(len(keys) - start, len(self.buffer) - self.filled)
            for name, values in fields.items():
                self.buffer[name][self.filled:self.filled + count] = values[start:start + count]
            self.filled += count  # only after the copy: an interruption never flushes half-written rows
            self.unwritten -= count
            start += count
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self):
        """Write the filled rows as a new shard (temporary file, fsync, rename) and start a new buffer."""
        if self.buffer is not None and self.filled:
            name = shard_stem(self.process_index, self.next_number)
            temp = self.folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                with open(temp, "xb") as stream:
                    np.save(stream, self.buffer[:self.filled])
                    stream.flush()
                    os.fsync(stream.fileno())
                # The checksum of the bytes on disk (just written, so read back from memory) goes into the name.
                os.replace(temp, self.folder / f"{name}-{checksum_file(temp)}.npy")
            finally:
                temp.unlink(missing_ok=True)
            self.next_number += 1
        self.buffer, self.filled = None, 0


def check_finite(keys, fields: dict, dtype: str):
    """Refuse values that would be stored as NaN/inf (float16 overflow, or a model producing NaN)."""
    stored = fields["scale"] if dtype == "int8" else fields["values"]  # a NaN vector has a NaN scale
    finite = np.isfinite(stored.reshape(len(keys), -1)).all(axis=1)
    if not finite.all():
        bad = [key for key, ok in zip(keys, finite, strict=True) if not ok]
        raise FloatingPointError(
            f"values of {bad[:5]} are not finite when stored as {dtype} (NaN or inf from the model, or beyond the "
            "float16 range of +-65504). Check the model and its inputs, or store float32; nothing of them was kept.")
