"""Stage 1's side of the prompt table (common/prompt_table.py): the validation prompts and the negative prompt,
encoded with the text encoders that encode the captions and stored beside the shards.

`ft precompute --validation-dataset-file FILE` reads and checks the file before any model loads (the same checks
as `ft train`, sizes included, against the buckets of this run), then `PromptWriter` works out which prompts the
shard set lacks. Only those are encoded, in batches of `--batch-size`, after the run's models are loaded: a rerun
with a new validation file on an unchanged dataset loads the text encoders alone and encodes only its captions.
The negative (empty) prompt is a row of every table; a shard set written from now on has one from its first run.

Used by encode.py in three places: `check_validation_file` at the start, `PromptWriter(...)` once the encoders'
fingerprint is known (its `needed` says whether text encoders must load), and `PromptWriter.write` once they are
(it returns the manifest's `prompts` entry).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.common.logs import log
from ft.common.prompt_table import PROMPTS_FOLDER, prompt_bytes, text_fingerprint, text_key, write_prompt_file
from ft.common.validation_file import ValidationPrompt, default_size, read_validation_file, resolve_sizes

if TYPE_CHECKING:
    from ft.pipelines.base import ModelSpec

NEGATIVE_PROMPT = ""  # the negative prompt of classifier-free guidance, as the pipelines default it


def check_validation_file(path: str | None, spec: ModelSpec, vae_config: dict, transformer_config: dict,
                          buckets: list[tuple[int, int, int]]) -> list[ValidationPrompt]:
    """The validation file's prompts, checked as `ft train` will check them (no model is loaded)."""
    if not path:
        return []
    prompts = read_validation_file(path)
    resolve_sizes(prompts, path, spec, vae_config, transformer_config, default_size(buckets))
    return prompts


class PromptWriter:
    """The prompt table rows this run must add to `out`: each validation caption and the negative prompt.

    `needed` is what makes the text encoders load: the missing validation captions, and the negative prompt when
    there are validation prompts. Without a validation file the negative row is written only when the encoders are
    loaded anyway (a new shard set, new captions), so a rerun of an older shard set still loads no model."""

    def __init__(self, out: str | Path, fingerprints: dict[str, Any], encoding: dict[str, Any],
                 prompts: list[ValidationPrompt]):
        self.out = Path(out)
        fingerprint = text_fingerprint(fingerprints)
        captions = dict.fromkeys([NEGATIVE_PROMPT, *(p.caption for p in prompts)])
        self.keys = {c: text_key(c, fingerprint, encoding) for c in captions}
        self.missing = [c for c, k in self.keys.items() if not self._path(k).is_file()]
        self.needed = self.missing if prompts else []

    def _path(self, key: str) -> Path:
        return self.out / PROMPTS_FOLDER / f"{key}.safetensors"

    def write(self, spec: ModelSpec, encoders: dict | None, seq_len: int, batch_size: int) -> dict[str, Any]:
        """Encode and store the missing rows (when `encoders` are loaded); returns the manifest's `prompts` entry,
        empty while the table has no negative row."""
        import torch

        todo = self.missing if encoders is not None else []
        for start in range(0, len(todo), batch_size):
            captions = todo[start : start + batch_size]
            with torch.no_grad():
                cond = spec.encode_prompts(encoders, captions, seq_len)
            for j, caption in enumerate(captions):
                key = self.keys[caption]
                write_prompt_file(self.out, key, prompt_bytes({k: v[j] for k, v in cond.items()}, caption, key))
        validation = [c for c in todo if c != NEGATIVE_PROMPT]
        if validation:
            log.info(f"stored {len(validation)} validation prompt(s) in {self.out / PROMPTS_FOLDER}")
        if not self._path(self.keys[NEGATIVE_PROMPT]).is_file():
            return {}
        return {"folder": PROMPTS_FOLDER, "negative": self.keys[NEGATIVE_PROMPT]}
