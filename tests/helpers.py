"""Helpers the tests share (importable as `helpers`: pyproject puts tests/ on the path)."""

from __future__ import annotations

FP32 = ["--transformer-dtype", "fp32", "--vae-dtype", "fp32", "--text-encoder-dtype", "fp32"]
BUCKETS = ["--buckets", "9x32x32", "9x32x64", "1x32x32"]


def run_cli(argv: list[object]) -> object:
    """Run `ft argv` through the real command-line parser; returns the command's result."""
    from ft.common.cli import invoke

    return invoke([str(a) for a in argv], standalone=False)
HUNYUAN_FP32 = [*FP32, "--text-encoder-2-dtype", "fp32"]
# 32 Llama tokens after the template's crop (the default is 256): the same code path, half the step time on a CPU
HUNYUAN_TEXT = ["--max-sequence-length", "32"]


class BuiltClasses:
    """Records the class of every transformers model and tokenizer constructed while it is active (the real
    constructors run; only their class names are noted)."""

    def __enter__(self) -> list[str]:
        from transformers import PreTrainedModel, PreTrainedTokenizerBase

        self.built: list[str] = []
        self.originals = {cls: cls.__init__ for cls in (PreTrainedModel, PreTrainedTokenizerBase)}
        for cls, init in self.originals.items():
            def recording(obj, *args, _init=init, **kwargs):
                self.built.append(type(obj).__name__)
                _init(obj, *args, **kwargs)
            cls.__init__ = recording
        return self.built

    def __exit__(self, *exc: object) -> None:
        for cls, init in self.originals.items():
            cls.__init__ = init
