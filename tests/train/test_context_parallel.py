"""`ft train --cp-degree`: each sample's sequence split over the processes of a context-parallel group.

Under torchrun with gloo on the CPU (slow): cp 2 with Ulysses and with ring attention, and cp 2 x FSDP2 2 (4
processes), each against the 1-process run at the same samples per optimizer step, for Wan (diffusers' plan) and
CogVideoX (ft's plan: the joint text+video sequence); cp 2 for LTX-Video and HunyuanVideo (ft's plans), Wan I2V, with
gradient checkpointing, and for a full finetune; a cp 2 checkpoint resumed at cp 1 and at dp 2, a cp 1 one at cp 2;
the exported LoRA equal to the 1-process one, loaded by diffusers. Fast: the layouts refused before any weight
loads, with the numbers that would work.

Tolerance: the runs are fp32. A cp layout changes only the order of floating-point sums: ring attention merges
two halves of the keys through their log-sum-exp, Ulysses attends over the same keys in one piece, and a
gradient is the sum of two ranks' shares (all-reduced) instead of one backward's; that is about 1e-7 relative per
step (the 1-process-equal forward and gradients were measured at 2e-7 to 1e-6 relative), and over 4 Adam steps the
losses and grad norms stay within 1e-5 relative (the bound test_distributed.py uses for DDP and FSDP2). The LoRA
weights are compared by how far they moved, as test_distributed.py compares a full finetune: Adam divides each
gradient by its own size, so a weight whose true gradient is about zero (a cross-attention key direction softmax
is blind to) takes a step of random sign from rounding noise alone. Measured on tiny Wan after 4 steps: the
difference is 3e-5 (Ulysses) and 3e-4 (ring) of the norm of the learned lora_B weights, 4.5e-5 at most per
weight under ring; the tests allow 1e-3 of that norm.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ft.common.errors import UserError
from helpers import BUCKETS, FP32, run_cli, torchrun, train, train_args, train_log

STEPS = ["--train-steps", "4", "--lr", "3e-3", "--lr-warmup-steps", "1", "--seed", "9", "--checkpointing-steps",
         "2", "--report-to", "none"]
LORA = ["--rank", "4", "--lora-alpha", "8"]
FULL = ["--training-type", "full-finetune"]
FAMILIES = {"wan": ("tiny_wan", "wan_shards", []), "cogvideox": ("tiny_cog", "cog_shards", []),
            "ltx_video": ("tiny_ltx", "ltx_shards", ["--first-frame-conditioning-p", "0.5"]),
            "hunyuan_video": ("tiny_hunyuan", "hunyuan_shards", [])}


def losses(out):
    return [r["loss"] for r in train_log(out)]


def assert_same_run(a, b):
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)
    norms = [[r["grad_norm"] for r in train_log(out)] for out in (a, b)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    assert_same_lora(a, b)


def assert_same_lora(a, b):
    """The LoRA of run `a` against `b`'s: their difference under 0.1% of what `b` learned (its lora_B weights,
    which start at zero)."""
    wa, wb = (load_file(out / "pytorch_lora_weights.safetensors") for out in (a, b))
    assert wa.keys() == wb.keys()
    differ = torch.cat([(wa[k] - wb[k]).flatten() for k in wb]).norm()
    learned = torch.cat([wb[k].flatten() for k in wb if "lora_B" in k]).norm()
    assert differ < 1e-3 * learned, (differ, learned)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """`runs(family, nproc, *flags)`: the run's output folder, each run made once per module (1 process in this
    process, more under torchrun)."""
    cache = {}

    def run(family, nproc, *flags):
        key = (family, nproc, flags)
        if key not in cache:
            model_fixture, shards_fixture, extra = FAMILIES[family]
            model, shards = request.getfixturevalue(model_fixture), request.getfixturevalue(shards_fixture)
            extra = [*extra, *([] if "--training-type" in flags else LORA)]
            out = tmp_path_factory.mktemp(f"cp-{family}") / "out"
            if nproc == 1:
                train(family, model, shards, out, *STEPS, *extra, *flags)
            else:
                done = torchrun(nproc, train_args(family, model, shards, out, *STEPS, *extra, *flags))
                assert done.returncode == 0, done.stderr[-3000:]
                (out / "stderr.txt").write_text(done.stderr)
            cache[key] = out
        return cache[key]

    return run


# ------------------------------------------------------------------------------------------------ torchrun (slow)

# Wan under Ulysses trains 2 samples per optimizer step (a batch of 2 split along the sequence): that run is also the
# cp 2 checkpoint test_checkpoints_resume_across_cp_degrees_and_continue_the_curve resumes at dp 2, one launch for both
WAN_ULYSSES = ("--cp-degree", "2", "--cp-mode", "ulysses", "--batch-size", "2")
BATCH = {("wan", "ulysses"): 2}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["wan", "cogvideox"])
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_cp2_follows_the_one_process_curve(runs, family, mode):
    batch = BATCH.get((family, mode), 1)
    flags = ("--batch-size", str(batch)) if batch > 1 else ()
    out = runs(family, 2, "--cp-degree", "2", "--cp-mode", mode, *flags)
    assert_same_run(out, runs(family, 1, *flags))
    assert "context parallel over 2 processes" in (out / "stderr.txt").read_text()
    state = json.loads((out / "checkpoints" / "checkpoint-000004" / "state.json").read_text())
    assert state["parallel"] == {"world_size": 2, "dp_degree": 1, "dp_shards": 1, "cp_degree": 2}
    assert state["samples_per_step"] == batch  # a cp group reads one stream: its batch, not one per process


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_cp2_with_gradient_checkpointing_recomputes_through_the_split(runs, mode):
    """The blocks' recomputation in backward runs the split's hooks and the attention's collectives again, in the
    same order on every rank."""
    out = runs("wan", 2, "--cp-degree", "2", "--cp-mode", mode, "--gradient-checkpointing")
    assert_same_run(out, runs("wan", 1))


@pytest.mark.slow
def test_a_full_finetune_under_cp2_follows_the_one_process_curve(runs):
    out, base = runs("wan", 2, "--cp-degree", "2", *FULL), runs("wan", 1, *FULL)
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in train_log(out)] == pytest.approx([r[key] for r in train_log(base)], rel=1e-5)


@pytest.mark.slow
def test_ltx_video_cp2_follows_the_one_process_curve_with_first_frame_conditioning(runs):
    """The per-token timesteps of first-frame conditioning are split with the tokens (ft's plan); the default mode
    for 4 heads over 2 ranks is Ulysses."""
    out = runs("ltx_video", 2, "--cp-degree", "2")
    assert_same_run(out, runs("ltx_video", 1))


@pytest.mark.slow
def test_hunyuan_video_cp2_counts_the_text_once(runs):
    """Every rank holds the whole (padded) text; the joint attention masks the other ranks' copies (ft's
    processor), so the curve is the 1-process one."""
    out = runs("hunyuan_video", 2, "--cp-degree", "2")
    assert_same_run(out, runs("hunyuan_video", 1))


@pytest.mark.slow
def test_wan_i2v_cp2_follows_the_one_process_curve(tmp_path, shapes_data):
    """Wan 2.1 I2V: the image latents on the channels are split with the video tokens; the CLIP image embeddings
    join the text of the cross-attention, whole on every rank."""
    from ft.pipelines.registry import save_tiny_model

    model = save_tiny_model("wan:i2v", tmp_path / "model")
    run_cli(["precompute", "--model", "wan", "--pretrained", model, *FP32, "--image-encoder-dtype", "fp32",
             "--dataset", shapes_data, "--out", tmp_path / "shards", *BUCKETS, "--batch-size", "2"])
    train("wan", model, tmp_path / "shards", tmp_path / "one", *STEPS, *LORA)
    done = torchrun(2, train_args("wan", model, tmp_path / "shards", tmp_path / "cp2", *STEPS, *LORA, "--cp-degree",
                                  "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path / "cp2", tmp_path / "one")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_cp2_by_fsdp2_on_4_processes_follows_the_one_process_curve(runs, family):
    out = runs(family, 4, "--cp-degree", "2", "--dp-shards", "2")
    assert "FSDP2 over 2 shards x context parallel over 2" in (out / "stderr.txt").read_text()
    assert_same_run(out, runs(family, 1, "--batch-size", "2"))


@pytest.mark.slow
def test_checkpoints_resume_across_cp_degrees_and_continue_the_curve(runs, tiny_wan, wan_shards, tmp_path):
    import shutil

    straight = runs("wan", 1, "--batch-size", "2")
    saved = runs("wan", 2, *WAN_ULYSSES)  # Ulysses is tiny Wan's default mode at cp 2 (2 heads)
    assert losses(saved) == pytest.approx(losses(straight), rel=1e-5)
    for name, nproc, layout, source in (("cp1", 1, ["--batch-size", "2"], saved), ("dp2", 2, [], saved),
                                        ("cp2 from cp1", 2, ["--cp-degree", "2", "--batch-size", "2"], straight)):
        out = tmp_path / name
        shutil.copytree(source / "checkpoints" / "checkpoint-000002", out / "checkpoints" / "checkpoint-000002")
        argv = train_args("wan", tiny_wan, wan_shards, out, *STEPS, *LORA, *layout, "--resume-from-checkpoint",
                          "latest")
        if nproc == 1:
            run_cli(argv)
        else:
            done = torchrun(nproc, argv)
            assert done.returncode == 0, done.stderr[-3000:]
            moved = ("saved under one process, now context parallel over 2 processes" if source is straight else
                     "saved under context parallel over 2 processes, now DDP over 2 replicas")
            assert moved in done.stderr
        assert losses(out) == pytest.approx(losses(straight)[2:], rel=1e-5)
        assert_same_lora(out, straight)


@pytest.mark.slow
def test_the_exported_lora_of_a_cp2_run_loads_in_diffusers(runs, tiny_wan):
    import numpy as np
    from diffusers import WanPipeline

    out = runs("wan", 2, *WAN_ULYSSES)

    def render(pipe):
        return pipe(prompt="a red circle", num_frames=9, height=32, width=32, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np", max_sequence_length=16).frames[0]

    pipe = WanPipeline.from_pretrained(tiny_wan)
    base = render(pipe)
    pipe.load_lora_weights(out)
    assert np.abs(render(pipe) - base).max() > 1e-5


# ------------------------------------------------------------------------------------------------ refusals (fast)

def check(tmp_path, model, shards, family="wan", **flags):
    """check_context_parallel on a real config, spec and shard set, as `ft train` runs it before loading."""
    from ft.pipelines.registry import spec_for
    from ft.train.config import TrainConfig
    from ft.train.context_parallel import check_context_parallel
    from ft.train.loader import ShardSet

    cfg = TrainConfig(model=family, pretrained=str(model), shards=[str(shards)], output_dir=str(tmp_path), **flags)
    spec = spec_for(cfg)
    return check_context_parallel(cfg, spec, spec.load_config("transformer", cfg), [ShardSet(shards)])


def test_the_default_mode_follows_the_head_count(tmp_path, tiny_wan, wan_shards):
    # tiny Wan: 2 heads, buckets of 12, 24 and 4 video tokens
    assert check(tmp_path, tiny_wan, wan_shards, cp_degree=2) == "ulysses"
    assert check(tmp_path, tiny_wan, wan_shards, cp_degree=4) == "ring"


def test_a_bucket_whose_tokens_do_not_split_is_refused_with_the_degrees_that_would(tmp_path, tiny_wan, wan_shards):
    with pytest.raises(UserError, match=r"--cp-degree 3: bucket 1x32x32 \(video tokens\) is 4 per sample, which do "
                                        r"not split into 3 equal parts; use --cp-degree 2 or 4"):
        check(tmp_path, tiny_wan, wan_shards, cp_degree=3)


def test_a_sequence_no_degree_splits_and_a_validation_video_that_does_not_split_say_what_to_change():
    from ft.train.context_parallel import check_cp_layout

    # 9 x 11 x 13 = 1287 tokens: odd, and neither 3 nor 5 nor 7 divides it alongside the 2 heads Ulysses needs
    with pytest.raises(UserError, match=r"--cp-degree 2: bucket 9x352x416 \(video tokens\) is 1287 per sample, "
                                        r"which do not split into 2 equal parts; no --cp-degree from 2 to 8 splits "
                                        r"it under ulysses, or precompute buckets whose token count divides by 2\.$"):
        check_cp_layout(2, "ulysses", 2, {"9x352x416 (video tokens)": 1287}, "Wan")
    with pytest.raises(UserError, match=r"bucket 5x48x48 of --validation-dataset-file \(video tokens\) is 27 per "
                                        r"sample, .*; use --cp-degree 3, or change that row's num_frames, height or "
                                        r"width \(--validation-dataset-file\) so its token count divides by 2\.$"):
        check_cp_layout(2, "ring", 2, {"5x48x48 of --validation-dataset-file (video tokens)": 27}, "Wan")


def test_ulysses_with_heads_that_do_not_divide_is_refused(tmp_path, tiny_wan, wan_shards):
    with pytest.raises(UserError, match=r"--cp-mode ulysses --cp-degree 4: .* Wan's 2 attention heads, which do not "
                                        r"divide; use --cp-degree 2, or --cp-mode ring"):
        check(tmp_path, tiny_wan, wan_shards, cp_degree=4, cp_mode="ulysses")


def test_the_text_of_cogvideox_joint_sequence_must_split_too(tmp_path, tiny_cog, cog_shards):
    from ft.pipelines.cogvideox import CogVideoXSpec
    from ft.train.context_parallel import check_cp_layout

    assert check(tmp_path, tiny_cog, cog_shards, family="cogvideox", cp_degree=4, cp_mode="ring") == "ring"
    # CogVideoX-5b at 49x480x720: 13 latent frames of 30x45 patches, and its 226 text tokens (2 x 113): cp 2 only
    vae = {"temporal_compression_ratio": 4, "block_out_channels": [128, 256, 256, 512]}
    sequences = CogVideoXSpec().cp_sequences((49, 480, 720), vae, {"patch_size": 2}, 226)
    assert sequences == {"video tokens": 13 * 30 * 45, "text tokens": 226}
    with pytest.raises(UserError, match=r"--cp-degree 3: bucket 49x480x720 \(text tokens\) is 226 per sample, "
                                        r"which do not split into 3 equal parts; use --cp-degree 2, or precompute"):
        check_cp_layout(3, "ring", 48, {f"49x480x720 ({k})": v for k, v in sequences.items()}, "CogVideoX")


def test_ring_attention_is_refused_where_the_joint_attention_has_a_mask():
    from ft.pipelines.hunyuan_video import HunyuanVideoSpec
    from ft.train.context_parallel import check_cp_layout, default_cp_mode

    spec = HunyuanVideoSpec()
    assert default_cp_mode(24, 5, spec.cp_modes) == "ulysses"  # then refused for the heads, naming the degrees
    with pytest.raises(UserError, match="--cp-mode ring: HunyuanVideo splits only with ulysses attention: its joint "
                                        "attention carries a mask"):
        check_cp_layout(2, "ring", 24, {}, spec.display_name, spec.cp_modes, spec.cp_modes_why)
    with pytest.raises(UserError, match="24 attention heads, which do not divide; use --cp-degree 2 or 3 or 4 or 6 "
                                        "or 8 or 12 or 24.$"):
        check_cp_layout(5, "ulysses", 24, {}, spec.display_name, spec.cp_modes, spec.cp_modes_why)


def test_what_ring_attention_cannot_do_on_a_gpu_is_refused(tmp_path, tiny_wan):
    """Ring attention on a GPU runs diffusers' cuDNN op: half precision, and no gradient checkpointing (checked on
    the config alone: this machine has no GPU)."""
    from ft.train.config import TrainConfig
    from ft.train.context_parallel import check_gpu_ring

    def config(**flags):
        return TrainConfig(model="wan", pretrained=str(tiny_wan), shards=["s"], output_dir=str(tmp_path), cp_degree=2,
                           cp_mode="ring", **flags)

    check_gpu_ring(config(transformer_dtype="bf16"))
    with pytest.raises(UserError, match="--cp-mode ring with --gradient-checkpointing on a GPU"):
        check_gpu_ring(config(transformer_dtype="bf16", gradient_checkpointing=True))
    with pytest.raises(UserError, match="in bf16 or fp16 only, and --transformer-dtype fp32"):
        check_gpu_ring(config(transformer_dtype="fp32"))


def test_a_family_without_a_plan_is_refused(tmp_path, tiny_wan, wan_shards):
    from ft.pipelines.registry import SPECS
    from ft.train.config import TrainConfig
    from ft.train.context_parallel import check_context_parallel

    spec = next(s() for s in SPECS.values() if s.context_parallel is None)
    cfg = TrainConfig(model="wan", pretrained=str(tiny_wan), shards=[str(wan_shards)], output_dir=str(tmp_path),
                      cp_degree=2)
    with pytest.raises(UserError, match=f"no context-parallel plan for {spec.display_name} yet .*Wan"):
        check_context_parallel(cfg, spec, {"num_attention_heads": 24}, [])


def test_a_world_that_cp_does_not_divide_is_refused_before_anything_loads(tmp_path, tiny_wan, wan_shards):
    with pytest.raises(UserError, match="--cp-degree 2 splits each sample over 2 processes, but ft was started as "
                                        "one process: launch it with `torchrun"):
        train("wan", tiny_wan, wan_shards, tmp_path / "out", "--cp-degree", "2")
    from ft.common.launcher import World
    from ft.train.parallel import resolve_layout

    world = World(rank=0, size=4, local_rank=0, launcher="torchrun")
    assert resolve_layout(-1, 2, world, 2).name == "FSDP2 over 2 shards x context parallel over 2"
    assert resolve_layout(-1, -1, world, 4).name == "context parallel over 4 processes"
    with pytest.raises(UserError, match="--dp-shards 4 x --cp-degree 2 asks for a world of 8 processes"):
        resolve_layout(-1, 4, world, 2)


@pytest.mark.parametrize(("flags", "message"), [
    (["--cp-mode", "stripes", "--cp-degree", "2"], "--cp-mode 'stripes' is not one of: ring, ulysses"),
    (["--cp-degree", "0"], "--cp-degree"),
    (["--cp-mode", "ring"], "--cp-mode ring applies with --cp-degree above 1"),
])
def test_bad_cp_flags_are_refused(tmp_path, tiny_wan, wan_shards, flags, message):
    with pytest.raises(UserError, match=message):
        train("wan", tiny_wan, wan_shards, tmp_path / "out", *flags)
