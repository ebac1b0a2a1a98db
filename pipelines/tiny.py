"""Toy-size models and tokenizers built locally, for tests and `ft demo` (no download, ever).

Tokenizers are trained in milliseconds with the `tokenizers` library on a small English corpus and wrapped in the
real transformers classes, so `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip them. Models come from
each spec's `tiny_components(seed)`; `save_tiny_model` writes them as a diffusers folder that the real loading code
(`from_pretrained` on a local folder) reads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ft.common.synthetic import COLORS, MOTIONS, SHAPES

_WORDS = (
    "a an the of on in at to from with and or is are moving left right top bottom dark light background "
    "video clip scene shows camera slowly quickly person dog cat car tree sky water city street night day "
    "small large bright colourful circle square triangle shape object across over under through frame motion"
).split()


def corpus() -> list[str]:
    """Sentences like the demo's captions plus common words, enough for a tokenizer to learn useful pieces."""
    lines = [" ".join(_WORDS)]
    for color in COLORS:
        for shape in SHAPES:
            for motion in MOTIONS:
                lines.append(f"a {color} {shape} moving {motion} on a dark background")
    return lines * 4


def t5_tokenizer() -> Any:
    """A T5Tokenizer (sentencepiece Unigram) whose pieces are the corpus words and single characters.

    <pad>=0, </s>=1, <unk>=2 as in T5. Each corpus word is one piece, so a caption is a handful of tokens.
    """
    from collections import Counter

    from transformers import T5Tokenizer

    words = Counter(w for line in corpus() for w in line.split())
    chars = sorted({c for w in words for c in w})
    total = sum(words.values())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, math.log(n / total)) for w, n in sorted(words.items())]
    vocab += [(c, -20.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def save_tiny_model(model: str, folder: str | Path, seed: int = 0) -> Path:
    """Build the tiny `model` family with random weights and save it as a diffusers folder."""
    from .base import import_class
    from .registry import get_spec

    spec = get_spec(model)
    parts = spec.tiny_components(seed)
    pipe = import_class(*spec.pipeline_class)(**parts)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder
