"""A full finetune of HunyuanVideo and Wan through the CLI (one parametrised test): the saved transformer loads with
the family's from_pretrained, a run resumed from its checkpoint ends bitwise equal to the straight run, and
`ft generate` takes the finetuned transformer as a component override. (CogVideoX's full-finetune resume is
test_resume.py's, LTX-Video's full finetune test_ltx_video.py's.)"""

from __future__ import annotations

import pytest
import torch

from helpers import FAMILIES, run_cli, train

PROMPT = "a red circle moving left to right on a dark background"
# the family's transformer class, and its own flags (Wan: another flow-matching timestep weighting)
CASES = {"hunyuan_video": ("HunyuanVideoTransformer3DModel", []),
         "wan": ("WanTransformer3DModel", ["--flow-weighting-scheme", "logit_normal"])}


@pytest.mark.parametrize("family", sorted(CASES))
def test_full_finetune_loads_with_from_pretrained_and_a_resumed_run_equals_a_straight_one(family, tiny_model,
                                                                                         family_shards, tmp_path):
    import diffusers

    model_class, extra = CASES[family]
    model, shards = tiny_model(family), family_shards(family)
    flags = ["--batch-size", "2", "--lr-warmup-steps", "0", "--report-to", "none", "--training-type",
             "full-finetune", "--train-steps", "4", "--checkpointing-steps", "2", "--lr", "1e-3", "--seed", "3", *extra]
    straight = train(family, model, shards, tmp_path / "straight", *flags)
    resumed = train(family, model, shards, tmp_path / "resumed", *flags, "--resume-from-checkpoint",
                    tmp_path / "straight" / "checkpoints" / "checkpoint-000002")
    assert straight["steps"] == resumed["steps"] == 4
    transformer = getattr(diffusers, model_class)
    a = transformer.from_pretrained(tmp_path / "straight" / "transformer").state_dict()
    b = transformer.from_pretrained(tmp_path / "resumed" / "transformer").state_dict()
    base = transformer.from_pretrained(model, subfolder="transformer").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert sum(not torch.equal(a[k], base[k]) for k in a) > len(a) // 2
    _, dtypes, _ = FAMILIES[family]
    video = run_cli(["generate", "--model", family, "--pretrained", model, *dtypes, "--transformer-id",
                     tmp_path / "straight" / "transformer", "--prompt", PROMPT, "--num-frames", "1", "--height", "32",
                     "--width", "32", "--num-inference-steps", "1", "--out", tmp_path / "ft.mp4"])
    assert video.is_file()
