"""THE contract between `ft precompute` and `ft train`: WebDataset tar shards plus a manifest.

A shard set is a folder holding `manifest.json` and `*.tar` shards. A sample is the tar members sharing a key:

    <key>.latents.safetensors   the VAE posterior of the clip (the ModelSpec names the tensors: mean, logvar, ...)
    <key>.cond.safetensors      the text conditioning (prompt_embeds, masks, pooled embeddings, ...)
    <key>.json                  caption, source path, source fps, frame indices, bucket, latent shape, model family

`<key>` is a content hash (`sample_key`) of everything that produced the sample, so a rerun, a grown dataset or
another experiment can reuse what was already encoded. Tensors travel as safetensors and metadata as JSON: no
pickle anywhere in the data path. Any plain WebDataset reader can read the shards; `iter_shard` here adds
verification and a zero-copy decode (tensors are views of the bytes read from the tar). Each shard's manifest
entry records two digests of its bytes: sha256 (the archival one) and xxh3-128, which hashes at several GB/s and
is what the reader checks (bench/loader.py: sha256 held the verified first pass to about a quarter of the
unverified rate; xxh3 keeps it within 2x). Manifests written before xxh3 was recorded are verified by sha256.

Shards are written to `<name>.tar.tmp` and renamed when complete, so a killed job never leaves a truncated
`.tar` that looks whole; the manifest lists only completed shards, and says whether the run that wrote it
finished (`complete`, and `missing`: the dataset's samples not encoded yet, per bucket). `require_complete` is
what `ft train` asks before it trains. Each shard has a compact index file beside it (`<shard>.idx`: keys, half
keys, bucket, byte spans) that reruns read instead of the tar headers, and the set has one index of every sample
(`set_index.bin`, fixed-width columns that `ft train` memory-maps and plans from with numpy; written by the merge,
or built once from the `.idx` files for an older set).

The contract is split by concern; this module names it in one place:
- codec.py: tensors <-> safetensors bytes, sample keys, file digests;
- buckets.py: the `FRAMESxHEIGHTxWIDTH` spelling (`parse_bucket`, `bucket_name`);
- manifest.py: `Manifest` (`Manifest.read`: the merged manifest alone), `ShardInfo`, `require_complete`;
- journal.py: the partial manifests of precompute jobs and the merged view of them: `load_manifest` and
  `open_shard_set`, the set as readers that must see unmerged jobs (`ft train`, `ft inspect`) ask for it;
- reader.py: `iter_shard`, `shard_index`, the index files (`shard_rows`);
- set_index.py: the whole-set index (`open_set_index`, `write_set_index`, `SetIndex`), its format documented there;
- writer.py: `ShardWriter` (and the `kill_point` test hook);
- liveness.py: whether the writer a lock file names still runs (precompute's locks, the jobs' status);
- prompts.py: the prompt table (validation prompts and the empty caption's conditioning).

Safety: the reader refuses any member that is not `.json` or `.safetensors` (a `.pth`, `.pyd` or `.pickle`
would be a pickle, which can run code when loaded), checks every safetensors header against the bytes it
describes, and never extracts anything: reading a shard set writes nothing anywhere.

Test hook: `FT_TEST_KILL_AT=<point>[:<n>]` (writer.py) stops `ft precompute` at a named point.
"""

from __future__ import annotations

from .buckets import bucket_name, parse_bucket
from .codec import file_digest, new_hasher, sample_key, stack_tensors, tensors_from_bytes, tensors_to_bytes
from .journal import (
    JOBS_DIR,
    JobState,
    append_journal,
    finalize_command,
    job_stem,
    load_manifest,
    merge_leftovers,
    merged_view,
    open_shard_set,
    read_journal,
    read_states,
)
from .manifest import (
    ACTIVE_KEYS_NAME,
    EMPTY_CAPTION_NAME,
    INPUT_FILES,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    TENSOR_GROUPS,
    Manifest,
    ShardInfo,
    require_complete,
    write_atomic,
)
from .reader import (
    ALLOWED_MEMBER_SUFFIXES,
    IndexRow,
    Sample,
    ShardCorruptError,
    _tar_members,
    describe_shard,
    index_path,
    iter_shard,
    read_index_file,
    rows_from_headers,
    shard_index,
    shard_keys,
    shard_rows,
    write_index_file,
)
from .set_index import INDEX_NAME, SetIndex, open_set_index, write_set_index
from .set_index_build import PreviousIndex
from .writer import ShardWriter, kill_point, shard_number

__all__ = [
    "_tar_members", "ACTIVE_KEYS_NAME", "ALLOWED_MEMBER_SUFFIXES", "append_journal", "bucket_name", "describe_shard",
    "EMPTY_CAPTION_NAME", "file_digest", "finalize_command", "index_path", "IndexRow", "INPUT_FILES", "iter_shard",
    "job_stem", "JOBS_DIR", "JobState", "kill_point", "load_manifest", "Manifest", "MANIFEST_NAME", "merge_leftovers",
    "merged_view", "new_hasher", "open_shard_set", "parse_bucket", "read_index_file", "read_journal", "read_states",
    "require_complete", "rows_from_headers", "Sample", "sample_key", "SCHEMA_VERSION", "shard_index", "shard_keys",
    "shard_number", "shard_rows", "ShardCorruptError", "ShardInfo", "ShardWriter", "stack_tensors", "TENSOR_GROUPS",
    "tensors_from_bytes", "tensors_to_bytes", "write_atomic", "write_index_file", "INDEX_NAME", "SetIndex",
    "open_set_index", "write_set_index", "PreviousIndex"
]
