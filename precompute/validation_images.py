"""Stage 1's image rows of the prompt table: the conditioning of each validation row of an image-to-video run.

A row's conditioning frames (its `image_path`, or its `video_path`'s first frame; for first-last-frame models its
`last_image_path` or the video's last frame: common/shards/prompts.py) are decoded and resized to the row's size as
training clips are (`resize_to_bucket`), then encoded with the family's `encode_image`, the code that made the
training samples' `image` group. The row stores the frames as uint8 (`pixels` [N, C, H, W]: the pipeline takes the
image itself) beside those tensors (the image encoder's embeddings, which validation hands the pipeline in place of
an image encoder it does not load), under `image_row_key`: content-addressed like the prompt rows, so a rerun
writes only the rows it lacks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.common.errors import UserError
from ft.common.logs import log
from ft.common.shards.prompts import PROMPTS_FOLDER, ValidationPrompt, image_row_key, prompt_bytes, write_prompt_file
from ft.pipelines.base import ModelSpec
from ft.pipelines.image import ImageConditioning

from .media import MediaError, open_media, resize_to_bucket

if TYPE_CHECKING:
    import torch


def row_pixels(prompt: ValidationPrompt, conditioning: ImageConditioning, decoder: str, resize_mode: str,
               where: str) -> torch.Tensor:
    """A row's conditioning frames at its size: [N, C, H, W] in [-1, 1]."""
    import torch

    _, height, width = prompt.size
    pixels = []
    for file, which in prompt.frame_sources(conditioning.frames):
        try:
            reader = open_media(file, decoder)
            index = 0 if which == "first" else reader.num_frames - 1
            pixels.append(resize_to_bucket(reader.read([index]), height, width, resize_mode)[0])
        except MediaError as e:
            raise UserError(f"{where}: {file}: {e}; fix the file or the row's path.") from e
    return torch.stack(pixels)


def write_image_rows(out: Path, path: str, prompts: list[ValidationPrompt], spec: ModelSpec,
                     models: Callable[[], dict[str, Any]], conditioning: ImageConditioning, encoding: dict[str, Any],
                     vae: dict[str, Any], decoder: str, resize_mode: str, seq_len: int) -> int:
    """Encode and store the image rows `out` lacks; `models` loads the VAE and the image (and, where the text
    encoder reads the image with the prompt, text) encoders when first called. Returns how many rows were
    written."""
    import torch

    todo = [(p, image_row_key(p, encoding, vae)) for p in prompts]
    todo = [(p, key) for p, key in todo if not (out / PROMPTS_FOLDER / f"{key}.safetensors").is_file()]
    for prompt, key in todo:
        pixels = row_pixels(prompt, conditioning, decoder, resize_mode, f"{path} row {prompt.index + 1}")
        frames = pixels.permute(1, 0, 2, 3)[None]
        uint8 = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        tensors = {"pixels": uint8}
        with torch.no_grad():
            if conditioning.caption:  # HunyuanVideo-I2V: the prompt's (and negative's) embeddings read the image
                encoded = spec.encode_image(models(), frames, prompt.size[0], conditioning, [prompt.caption], seq_len)
                from PIL import Image

                image = Image.fromarray(uint8[0].permute(1, 2, 0).numpy())  # as the pipeline takes its image
                for side, text in (("prompt", prompt.caption), ("negative", "")):
                    embeds = spec.image_prompt_embeds(models(), [image], [text], seq_len, conditioning,
                                                      negative=side == "negative")
                    tensors |= {f"{side}.{name}": value[0] for name, value in embeds.items()}
            else:
                encoded = spec.encode_image(models(), frames, prompt.size[0], conditioning)
        tensors |= {name: value[0] for name, value in encoded.items()}
        write_prompt_file(out, key, prompt_bytes(tensors, f"image row of {prompt.caption[:60]}", key))
    if todo:
        log.info(f"stored the image conditioning of {len(todo)} validation row(s) in {out / PROMPTS_FOLDER}")
    return len(todo)
