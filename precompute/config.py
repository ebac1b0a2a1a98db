"""`ft precompute` and `ft check-data` settings: the dataset, the buckets and frame sampling, the data policy
(what happens to bad items), and how shards are written."""

from __future__ import annotations

from dataclasses import dataclass

from ft.common.config import REQUIRED, check_choice, check_positive, opt
from ft.common.errors import UserError
from ft.common.model_args import ModelArgs
from ft.common.shards import MANIFEST_NAME
from ft.pipelines.registry import SPECS, per_family
from ft.precompute.media import FRAME_SAMPLING, RESIZE_MODES

DATA = "Data"
POLICY = "Bad input"
OUTPUT = "Output"
ENCODING = "Encoding"
JOBS = "Cluster jobs"
ON_ERROR = ("skip", "fail")


@dataclass(kw_only=True)
class DataArgs:
    """What a dataset is read as: its layout, the buckets and frames, and the policy for bad items."""

    dataset: str = opt(REQUIRED, "Dataset folder or metadata file (videos.txt+prompts.txt, metadata.csv/json/jsonl/"
                                 "parquet, or media with .txt captions).", panel=DATA)
    video_column: str | None = opt(None, "Column (or .txt file) holding media paths; found by itself if unset.",
                                   panel=DATA)
    caption_column: str | None = opt(None, "Column (or .txt file) holding captions; found by itself if unset.",
                                     panel=DATA)
    buckets: list[str] = opt([], "FRAMESxHEIGHTxWIDTH buckets, e.g. 49x480x720 49x720x480. Each clip goes to the "
                                 "nearest aspect ratio it has frames for. Default: the model's.", panel=DATA)
    frame_sampling: str = opt("head", "Which frames fill a bucket: head (from the start, every --frame-stride-th) "
                                      "or uniform (spread over the clip).", panel=DATA)
    frame_stride: int = opt(1, "With head sampling, take every Nth frame.", panel=DATA)
    resize_mode: str = opt("center-crop", "How frames take a bucket's size: center-crop (scale to cover, then crop "
                                          "the centre), stretch (scale to the size, bicubic; finetrainers' reshape "
                                          "mode bicubic) or crop (crop the centre, no scaling).", panel=DATA)
    id_token: str | None = opt(None, "A token put before every caption (finetrainers' id_token), e.g. a LoRA trigger "
                                     "word.", panel=DATA)
    strip_llm_prefixes: bool = opt(False, "Remove common LLM caption openings (\"The video shows\", \"In this "
                                          "video,\", ...) as finetrainers' remove_common_llm_caption_prefixes does.",
                                   panel=DATA)
    max_sequence_length: int | None = opt(None, "Text tokens per caption. Default: the model's "
                                                f"({per_family(lambda s: s.default_text_tokens)}), or a CogVideoX "
                                                "transformer config's max_text_seq_length.", panel=DATA)
    decode_workers: int = opt(2, "Threads decoding media ahead of the encoders.", panel=ENCODING)
    decoder: str = opt("auto", "Video decoder: auto (decord, else PyAV), decord or pyav.", panel=ENCODING)
    on_error: str = opt("skip", "A bad item (missing, unreadable, too short, too small, empty caption, ...): skip "
                                "it with its reason recorded, or fail the run.", panel=POLICY)
    max_upscale: float = opt(2.0, "Refuse media that its bucket would enlarge more than this many times (a 240p "
                                  "clip in a 720p bucket is 3x).", panel=POLICY)
    allow_empty_captions: bool = opt(False, "Keep items whose caption is empty (otherwise they are rejected).",
                                     panel=POLICY)
    allow_outside_paths: bool = opt(False, "Accept media paths that lead outside the dataset folder (../x.mp4, "
                                           "/elsewhere/x.mp4); refused by default.", panel=POLICY)

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()
        check_choice(self.frame_sampling, FRAME_SAMPLING, "frame_sampling")
        check_choice(self.decoder, ("auto", "decord", "pyav"), "decoder")
        check_choice(self.on_error, ON_ERROR, "on_error")
        check_choice(self.resize_mode, RESIZE_MODES, "resize_mode")
        check_positive(self.frame_stride, "frame_stride")
        check_positive(self.decode_workers, "decode_workers", allow_zero=True)
        if self.max_sequence_length is not None:
            check_positive(self.max_sequence_length, "max_sequence_length")
        if self.max_upscale < 1:
            raise UserError(f"--max-upscale must be 1 or more (1: never enlarge), got {self.max_upscale}.")


@dataclass(kw_only=True)
class PrecomputeConfig(DataArgs, ModelArgs):
    """Encode a dataset through the VAE and text encoders into sharded WebDataset tars with a manifest."""

    out: str = opt(REQUIRED, f"Folder for the shards and {MANIFEST_NAME}. Rerunning into the same folder reuses what "
                             "is already encoded.", panel=OUTPUT)
    batch_size: int = opt(1, "Clips per VAE/text-encoder batch (clips of one bucket are batched together).",
                          panel=ENCODING)
    shard_samples: int = opt(256, "Samples per shard at most.", panel=OUTPUT)
    shard_max_mb: int = opt(1024, "Shard size at most, in MB.", panel=OUTPUT)
    validation_dataset_file: str | None = opt(None, "Validation prompts (finetrainers' file: csv, json, jsonl, parquet "
                                                    "or arrow with a caption column) to encode into the shard set's "
                                                    "prompt table, for `ft train --validation-dataset-file`. A rerun "
                                                    "with a new file encodes only its captions.", panel=OUTPUT)
    vae_tiling: bool = opt(False, "Encode with VAE tiling/slicing: less memory for large frames, a bit slower.",
                           panel=ENCODING)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N (under torchrun, auto is cuda:LOCAL_RANK).", panel=ENCODING)
    num_jobs: int | None = opt(None, "Run as one of N independent jobs writing into the same --out (a SLURM array, "
                                     "one process per GPU): each encodes the items a stable hash of their path "
                                     "gives it, and the last to finish merges the set. Default: "
                                     "SLURM_ARRAY_TASK_COUNT, else WORLD_SIZE, else 1.", panel=JOBS)
    job_index: int | None = opt(None, "This job's index, 0 to N-1. Default: SLURM_ARRAY_TASK_ID (less "
                                      "SLURM_ARRAY_TASK_MIN), else RANK, else 0.", panel=JOBS)
    finalize: bool = opt(False, "Merge the jobs in --out into one shard set and exit: `ft precompute --finalize "
                                "--out SHARDS` (add --allow-incomplete to merge jobs that did not all finish). "
                                "The last job to finish does this by itself.", panel=JOBS)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "shard_samples", "shard_max_mb"):
            check_positive(getattr(self, name), name)
        if self.num_jobs is not None:
            check_positive(self.num_jobs, "num_jobs")


@dataclass(kw_only=True)
class CheckDataConfig(DataArgs):
    """Check a dataset before paying for GPU time (loads no model): what precompute would reject, and why."""

    model: str = opt(REQUIRED, "Model family whose buckets and text length apply: "
                               f"{', '.join(list(SPECS)[:-1])} or {list(SPECS)[-1]} (and their aliases; see "
                               "`ft models`).", panel=DATA)
    pretrained: str | None = opt(None, "A diffusers folder or hub id of the base model: its tokenizer counts caption "
                                       "tokens and its configs check the buckets (no weights are loaded). Without "
                                       "it, the family's defaults apply and tokens are not counted.", panel=DATA)
    revision: str | None = opt(None, "Hub revision of --pretrained.", panel=DATA)
    mode: str = opt("auto", "t2v or i2v: which run to check for (image-to-video: each item's conditioning image too, "
                            "the clip's first frame or its image column's file). auto: what --pretrained is.",
                    panel=DATA)
    report: str | None = opt(None, "Write the full report as JSON here.", panel=OUTPUT)
