"""Toy-size models and tokenizers built locally, for tests and `ft demo` (no download, ever).

Tokenizers are trained in milliseconds with the `tokenizers` library on a small English corpus and wrapped in the
real transformers classes, so `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip them. The families'
`tiny_components(seed)` build their toy models from these; `registry.save_tiny_model` writes one as a diffusers
folder that the real loading code (`from_pretrained` on a local folder) reads.
"""

from __future__ import annotations

import math
from typing import Any

# the words of the synthetic clips' captions (cli/synthetic.py), which the toy tokenizers must know
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 220, 40),
          "white": (240, 240, 240)}
SHAPES = ("circle", "square")
MOTIONS = {"left to right": (1, 0), "right to left": (-1, 0), "top to bottom": (0, 1), "bottom to top": (0, -1)}

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


def tiny_t5_encoder(tokenizer: Any) -> Any:
    """A 2-layer T5 encoder of width 32 (CogVideoX's and LTX-Video's text encoder at toy size) for `tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _trained_bpe(lines: list[str], vocab_size: int, special_tokens: list[str], **bpe: Any
                 ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary and its merges, trained on `lines` in milliseconds with the `tokenizers` library."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    byte_level = bpe.pop("byte_level", False)
    tok = Tokenizer(models.BPE(unk_token=special_tokens[0], **bpe))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if byte_level else pre_tokenizers.Metaspace()
    extra = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()} if byte_level else {}
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, **bpe,
                                                       **extra))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


LLAMA_HEADER_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llama_tokenizer(extra_text: list[str] = (), extra_special: tuple[str, ...] = (), bos: bool = False,
                    words: tuple[str, ...] = (), vocab_size: int = 300) -> Any:
    """A LlamaTokenizer (BPE over sentencepiece-style pieces) that pads on the right, as HunyuanVideo's does, and
    knows the Llama-3 header tokens of HunyuanVideo's prompt template. `extra_text` (the template) joins the
    training text, so the template becomes about 170 tokens: more than the pipeline's crop of 95 (so the crop
    never eats the caption) and few enough that the caption fits in the 95 + 256 tokens the pipeline reads.
    `extra_special` tokens (HunyuanVideo-I2V's `<image>`), a BOS first (`bos`, as Llama-3's), `words` kept whole
    and the vocabulary's size place a template's tokens where the real tokenizer puts them."""
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>", "<pad>", *LLAMA_HEADER_TOKENS, *extra_special]
    vocab, merges = _trained_bpe(corpus() + list(extra_text), vocab_size, specials)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", padding_side="right", **({"add_bos_token": True} if bos else {}))
    tokenizer.add_special_tokens({"additional_special_tokens": [*LLAMA_HEADER_TOKENS, *extra_special]})
    if words:
        tokenizer.add_tokens(list(words))
    return tokenizer


def _clip_bpe(lines: list[str], vocab_size: int, specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's kind of BPE (byte-level pieces, word-final ones ending in "</w>") trained on `lines` in plain Python,
    so that every process builds the same one. The `tokenizers` trainer, given an end-of-word suffix, breaks ties
    between equally frequent pairs in a hash order that changes from process to process: the vocabulary's ids, its
    size and so the tiny CLIP's weights (and every weight drawn after them) changed from run to run. Here the alphabet
    is sorted and a tie goes to the smallest pair."""
    from collections import Counter

    from tokenizers import pre_tokenizers

    split = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        for piece, _ in split.pre_tokenize_str(line.lower()):
            piece = piece.lstrip("\u0120")  # the byte-level space: CLIP splits on spaces and keeps none
            if piece:
                words[(*piece[:-1], piece[-1] + "</w>")] += 1
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*specials, *alphabet, *(c + "</w>" for c in alphabet)])}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        words = Counter({_merged(word, best): count for word, count in words.items()})
    return vocab, merges


def _merged(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """`word`'s pieces with each adjacent occurrence of `pair` joined into one."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def clip_tokenizer() -> Any:
    """A CLIPTokenizer from a byte-level BPE whose word-final pieces end in "</w>", as CLIP's do, the same in every
    process. <|startoftext|>=0, <|endoftext|>=1 (also the padding, as in CLIP)."""
    from transformers import CLIPTokenizer

    lines = corpus() + ["a, b. c! d? (e) 'f' \"g\" 0 1 2 3 4 5 6 7 8 9 - : ;"]
    vocab, merges = _clip_bpe(lines, 800, ["<|startoftext|>", "<|endoftext|>"])
    return CLIPTokenizer(vocab=vocab, merges=merges)


# Qwen2.5-VL's chat template for text messages (its image and video parts left out): what
# HunyuanVideo15Pipeline's `apply_chat_template` renders, a system turn, a user turn and the assistant's header
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_tokenizer(extra_text: list[str] = (), vocab_size: int = 400) -> Any:
    """A Qwen2Tokenizer (byte-level BPE, as Qwen2.5's) with the chat tokens and template HunyuanVideo 1.5's
    pipeline renders, padding on the right. `extra_text` (the pipeline's system message) joins the training text;
    with few merges the system turn stays longer than the pipeline's crop of 108 tokens, as the real one is."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab, merges = _trained_bpe(corpus() + list(extra_text), vocab_size, specials, byte_level=True)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, padding_side="right",
                               chat_template=QWEN_CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tokenizer
