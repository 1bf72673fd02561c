"""The embed-once store: every unique image computed once, kept on disk, reused by every later run.

One mechanism serves two payloads:

- pooled embeddings [D] of a scorer (evaluation, scoring, search), stored as float32;
- backbone tokens [T, C] of NearID's frozen backbone (training: the backbone never changes, so its
  tokens are computed once and every epoch trains the head on them), stored as float16, int8 or
  float32. so400m tokens are 729 x 1152 values: 1.68 MB per image in float16.

One module per job (import from the module; this package re-exports nothing):

- `image_index`: `ImageIndex`, the unique images of a run keyed by content, with where each was
  first seen (a file, or dataset/row/column) for reading and for error messages.
- `format`: `fingerprint` (one key of everything a stored value depends on: the weights, the
  preprocessing, the decode rules, the numeric formats) and `StoreFormat` (what one stored item is:
  its shape and storage dtype, int8 quantisation).
- `layout`: the files of a store on disk: the folder of each fingerprint under a store root, its
  description, index and shards (named by their checksum, verified, memory-mapped).
- `embedding_store`: `EmbeddingStore`, the read view of a built store.
- `fill`: `fill`, computing what a store lacks in three stages, each a module of its own:
  `reader` (images decoded and preprocessed in DataLoader workers, cut into batches before they
  are shared between processes, so results are bit-identical whatever the process count) ->
  the encoder (the caller's) -> `writer` (shards written by a thread beside the encoder, through
  a bounded queue, so a fill takes the longer of its forwards and its writes, not their sum).

Every shard carries the checksum of its bytes in its name (`nearid.integrity`), taken from the
bytes as they are written; each fill verifies every shard of earlier fills before it trusts it,
and drops (with a warning naming it) and computes again any shard that is truncated, of another
layout, or of other content. Shards are
written to a temporary name and renamed, so an interrupted fill keeps every finished shard and the
next one computes only the rest. One fill at a time writes to a store folder (`nearid.locking`).
"""
