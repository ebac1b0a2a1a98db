"""`ft estimate`: parameter counts of the real configs on the meta device, bytes per stage, disk per sample."""

from __future__ import annotations

import re

import pytest

from ft.cli.estimate import EstimateConfig, estimate
from ft.common.errors import UserError
from ft.common.shards import iter_shard, load_manifest
from ft.pipelines.memory import activation_bytes
from ft.pipelines.registry import SPECS, get_spec
from helpers import run_cli


@pytest.fixture(scope="module")
def cog5b(cog_shards):
    # cog_shards first: the session's shared clips must be written before real-size models are built in this
    # process. libx264 (through PyAV) wrote one fixture clip with other bytes after that allocator churn, which
    # changed a sample key and so the golden loss curve (tests/train/test_golden_loss.py).
    return estimate(EstimateConfig(model="cogvideox", pretrained="THUDM/CogVideoX-5b", rank=64))


def test_cogvideox_5b_counts_and_bytes(cog5b):
    params = {c.name: round(c.params / 1e6) for c in cog5b.components}
    assert params == {"transformer": 5570, "vae": 216, "text_encoder": 4762}
    assert round(cog5b.trainable_params / 1e5) == 661  # LoRA r64 on to_q, to_k, to_v, to_out.0
    assert cog5b.precompute_bytes == (cog5b.component("vae").params + cog5b.component("text_encoder").params) * 2
    assert cog5b.train_static_bytes == cog5b.component("transformer").params * 2 + cog5b.trainable_params * 16
    (bucket,) = cog5b.buckets
    assert (bucket.bucket, bucket.video_tokens, bucket.text_tokens) == ("49x480x720", 13 * 30 * 45, 226)
    assert bucket.activations_checkpointed < bucket.activations_full / 10
    # latent mean + logvar [16, 13, 60, 90] and T5 embeddings [226, 4096], bf16, plus headers and the JSON
    tensors = (2 * 16 * 13 * 60 * 90 + 226 * 4096) * 2
    assert tensors < bucket.disk_per_sample < tensors + 8 * 1024
    assert "| all-in-one trainer |" in cog5b.report()


def test_full_finetune_sharded(cog5b):
    full = estimate(EstimateConfig(model="cogvideox", pretrained="cogvideox-5b", training_type="full-finetune",
                                   dp_shards=4, buckets=["49x480x720"]))
    params = full.component("transformer").params
    assert full.trainable_params == params
    # as `ft train` by default: weights, gradients and AdamW moments in --transformer-dtype (bf16), split 4 ways
    assert full.train_static["transformer weights (bf16, trained)"] == params * 2 / 4
    assert full.train_static["gradients (bf16)"] == params * 2 / 4
    assert full.train_static["adamw moments (bf16)"] == params * 4 / 4
    assert 0 < full.train_static["two blocks gathered by FSDP (bf16)"] < params * 2 / 10
    assert full.buckets[0].activations_full == cog5b.buckets[0].activations_full  # sharding splits state, not tokens


def test_context_parallel_ranks_shard_the_weights_with_fsdp_and_hold_them_whole_with_ddp():
    """As train/parallel.py lays them out: FSDP2 shards over --dp-shards x --cp-degree ranks, so dp 2 x cp 2 holds
    what --dp-shards 4 does; with --dp-shards 1 the cp ranks are DDP replicas, each with the weights whole."""
    full = dict(model="cogvideox", pretrained="cogvideox-5b", training_type="full-finetune", buckets=["49x480x720"])
    four = estimate(EstimateConfig(**full, dp_shards=4))
    two_by_two = estimate(EstimateConfig(**full, dp_shards=2, cp_degree=2))
    assert two_by_two.train_static == four.train_static
    assert "sharded over the 2 x 2 ranks of --dp-shards x --cp-degree" in two_by_two.report()
    one_by_two = estimate(EstimateConfig(**full, cp_degree=2))
    assert one_by_two.train_static == estimate(EstimateConfig(**full)).train_static
    assert "whole on each (with --dp-shards 1 the cp ranks are DDP replicas" in one_by_two.report()


def test_fp32_master_weights_and_8bit_moments(cog5b):
    full = estimate(EstimateConfig(model="cogvideox", pretrained="cogvideox-5b", training_type="full-finetune",
                                   master_dtype="fp32", optimizer="adamw-8bit"))
    params = full.component("transformer").params
    assert full.train_static == {"transformer weights (fp32, trained)": params * 4, "gradients (fp32)": params * 4,
                                 "adamw-8bit moments (8-bit)": params * 2}


def test_the_choices_are_ft_trains():
    from ft.cli import estimate as est
    from ft.train import compile as compiled
    from ft.train import config

    assert (est.TRAINING_TYPES, est.OPTIMIZERS, est.MASTER_DTYPES, est.COMPILE_MODULES) == (
        config.TRAINING_TYPES, config.OPTIMIZERS, config.MASTER_DTYPES, compiled.MODULES)


def test_train_flags_in_finetrainers_spellings_and_compile_modules_are_taken_as_ft_train_takes_them():
    """`ft estimate --compile_modules transformer` (and --layerwise_upcasting_modules) were refused as "a flag of ft
    train, not ft estimate" though estimate has them; `--compile-modules vae` was estimated where train refuses it."""
    wan = ["estimate", "--model", "wan", "--pretrained", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"]
    fp8 = run_cli([*wan, "--layerwise_upcasting_modules", "transformer", "--compile_modules", "transformer"])
    assert fp8.report() == run_cli([*wan, "--layerwise-upcasting-modules", "transformer", "--compile-modules",
                                    "transformer"]).report()
    assert fp8.report() != run_cli(wan).report()
    with pytest.raises(UserError, match="--compile-modules vae: ft train loads only the transformer"):
        run_cli([*wan, "--compile-modules", "vae"])
    with pytest.raises(UserError, match="--lr is a flag of ft train, not ft estimate"):
        run_cli([*wan, "--lr", "1e-4"])


@pytest.mark.parametrize("model,pretrained,transformer,vae", [
    ("ltx-video", "Lightricks/LTX-Video", 1923, 419), ("hunyuan-video", "hunyuan-video", 12821, 246)])
def test_ltx_and_hunyuan_use_their_built_in_configs(model, pretrained, transformer, vae):
    result = estimate(EstimateConfig(model=model, pretrained=pretrained))
    assert round(result.component("transformer").params / 1e6) == transformer
    assert round(result.component("vae").params / 1e6) == vae
    # the bucket precompute defaults to (HunyuanVideo: finetrainers' 49x480x768), from the one spec
    assert result.buckets[0].bucket == get_spec(model).default_buckets[0]
    assert result.buckets[0].cond_shapes["prompt_embeds"][0] == {"ltx-video": 128, "hunyuan-video": 256}[model]


@pytest.mark.parametrize("pretrained,transformer,vae,grid", [
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 1419, 127, (16, 13, 60, 104)),
    ("wan2.1-t2v-14b", 14288, 127, (16, 13, 60, 104)),
    ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", 5000, 705, (48, 13, 30, 52)),
    ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", 14288, 127, (16, 13, 60, 104))])
def test_wan_sizes_from_its_specs_configs(pretrained, transformer, vae, grid):
    """Wan 2.1's two sizes, Wan 2.2 TI2V-5B and Wan 2.2 A14B (one 14B expert held: each trains as its own run);
    the UMT5-XXL encoder counts its vocabulary once (5.68B: the
    embedding is tied); the latent grid, patches and text length are the ones precompute and train use."""
    result = estimate(EstimateConfig(model="wan", pretrained=pretrained))
    params = {c.name: round(c.params / 1e6) for c in result.components}
    assert params == {"transformer": transformer, "vae": vae, "text_encoder": 5681}
    (bucket,) = result.buckets
    assert bucket.bucket == "49x480x832" and bucket.latent_shape == grid
    assert (bucket.video_tokens, bucket.text_tokens) == (13 * grid[2] // 2 * grid[3] // 2, 512)
    assert ("one expert" in result.source) == ("A14B" in pretrained)


def test_a_local_two_expert_wan_is_estimated_as_one_expert(tiny_wan_a14b):
    result = run_cli(["estimate", "--model", "wan", "--pretrained", tiny_wan_a14b, "--buckets", "9x32x32"])
    assert "one expert" in result.source and [c.name for c in result.components] == ["text_encoder", "vae",
                                                                                     "transformer"]


def test_every_family_lists_its_checkpoints_by_names_its_alias_spelling_reaches():
    for name, spec in SPECS.items():
        assert spec.checkpoints, name
        for ckpt in spec.checkpoints:
            assert all(spec.find_checkpoint(n) is ckpt for n in ckpt.names)
            assert spec.find_checkpoint(ckpt.names[0].upper() + "/") is ckpt
        assert all(get_spec(alias).name == name for alias in spec.aliases)


def test_a_local_folder_is_read_and_its_shapes_are_those_precompute_writes(tiny_cog, cog_shards):
    result = run_cli(["estimate", "--model", "cogvideox", "--pretrained", tiny_cog, "--buckets", "9x32x32"])
    assert result.component("transformer").params == sum(
        p.numel() for p in SPECS["cogvideox"]().tiny_components()["transformer"].parameters())
    manifest = load_manifest(cog_shards)
    sample = next(s for s in iter_shard(cog_shards / manifest.shards[0].name) if s.meta["bucket"] == [9, 32, 32])
    (bucket,) = result.buckets
    assert tuple(sample.tensors["latents"]["mean"].shape) == bucket.latent_shape
    assert {k: tuple(v.shape) for k, v in sample.tensors["cond"].items()} == bucket.cond_shapes
    # these shards hold fp32 tensors (the tests encode in fp32); the estimate is for bf16, the default
    fp32_bytes = sum(t.numel() * 4 for group in sample.tensors.values() for t in group.values())
    assert 0 < bucket.disk_per_sample - fp32_bytes / 2 < 4 * 1024  # tensors, tar headers and the JSON


def test_activation_model():
    assert activation_bytes(10, 64, 100, 1, 4.0, checkpointing=False) == 10 * 32 * 64 * 100
    assert activation_bytes(10, 64, 100, 1, 4.0, checkpointing=True) == 10 * 2 * 64 * 100 + 32 * 64 * 100
    assert activation_bytes(10, 64, 100, 2, 4.0, False) == 2 * activation_bytes(10, 64, 100, 1, 4.0, False)


@pytest.mark.parametrize("kwargs,message", [
    ({"model": "cogvideox", "pretrained": "someone/finetune"}, "not a local folder nor a checkpoint ft knows"),
    ({"model": "sora", "pretrained": "x"}, "use one of: cogvideox, hunyuan_video, hunyuan_video_1_5, ltx_video"),
    ({"model": "cogvideox", "pretrained": "cogvideox-2b", "buckets": ["50x480x720"]}, "4k+1 frames"),
    ({"model": "cogvideox", "pretrained": "cogvideox-2b", "buckets": ["49x480"]}, "FRAMESxHEIGHTxWIDTH"),
])
def test_mistakes_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        estimate(EstimateConfig(**kwargs))


def test_flags_are_checked():
    with pytest.raises(UserError, match="--training-type"):
        EstimateConfig(model="cogvideox", pretrained="x", training_type="dora")
    with pytest.raises(UserError, match="--master-dtype 'bf16' is not one of"):
        EstimateConfig(model="cogvideox", pretrained="x", master_dtype="bf16")
    with pytest.raises(UserError, match="--dp-shards must be > 0"):
        EstimateConfig(model="cogvideox", pretrained="x", dp_shards=0)


def test_fp8_storage_counts_the_cast_layers_at_one_byte(cog5b):
    fp8 = estimate(EstimateConfig(model="cogvideox", pretrained="THUDM/CogVideoX-5b", rank=64,
                                  layerwise_upcasting_modules=["transformer"]))
    cast = fp8.train_static["transformer weights (float8_e4m3fn, frozen)"]
    kept = fp8.train_static["transformer weights (bf16, frozen)"]
    params = fp8.component("transformer").params
    assert cast + kept / 2 == params and 0.8 * params < cast < params  # norms, embeddings, proj_out stay bf16
    assert fp8.train_static_bytes < 0.65 * cog5b.train_static_bytes
    assert fp8.train_static["LoRA weights (fp32)"] == cog5b.train_static["LoRA weights (fp32)"]
    with pytest.raises(UserError, match="optimizer cannot update"):
        EstimateConfig(model="cogvideox", pretrained="x", training_type="full-finetune",
                       layerwise_upcasting_modules=["transformer"])


def test_offloaded_blocks_leave_the_gpu_but_the_ones_in_flight_and_the_fits_follow():
    from ft.train.offload import IN_FLIGHT

    kw = dict(model="hunyuan_video", pretrained="hunyuan-video", rank=128, buckets=["49x512x768"],
              layerwise_upcasting_modules=["transformer"])
    plain = estimate(EstimateConfig(**kw))
    (bucket,) = plain.buckets
    blocks = plain.block_bytes
    assert len(blocks) == 60 and all(b > 0 for b in blocks)  # 20 dual-stream + 40 single-stream, fp8 as stored
    assert 24 not in plain.fits(bucket) and 48 in plain.fits(bucket)
    n = plain.offload_to_fit(bucket, 24)
    assert n is not None and 0 < n < 60 and f"fits 24 GB cards with --offload-blocks {n}" in plain.report()
    off = estimate(EstimateConfig(**kw, offload_blocks=n))
    tail = blocks[-n:]
    assert off.offloaded_bytes == sum(tail)
    in_flight = sum(sorted(tail, reverse=True)[:IN_FLIGHT])
    assert off.train_static_bytes == pytest.approx(plain.train_static_bytes - sum(tail) + in_flight)
    assert 24 in off.fits(off.buckets[0]) and "offloading needs checkpointing" in off.report()
    assert off.buckets[0].activations_checkpointed == bucket.activations_checkpointed  # tokens do not move
    fewer = estimate(EstimateConfig(**kw, offload_blocks=n - 1))
    assert 24 not in fewer.fits(fewer.buckets[0])  # n is the fewest
    compiled = estimate(EstimateConfig(**kw, compile_modules=["transformer"]))
    assert compiled.train_static == plain.train_static and "torch.compile adds no weights" in compiled.report()


def test_offloading_refuses_what_ft_train_refuses():
    with pytest.raises(UserError, match="a full finetune updates every weight"):
        EstimateConfig(model="cogvideox", pretrained="x", training_type="full-finetune", offload_blocks=2)
    with pytest.raises(UserError, match="leave out --dp-shards"):
        EstimateConfig(model="cogvideox", pretrained="x", offload_blocks=2, dp_shards=2)
    with pytest.raises(UserError, match="--offload-blocks 99: this transformer has 42 blocks"):
        estimate(EstimateConfig(model="cogvideox", pretrained="THUDM/CogVideoX-5b", offload_blocks=99))


def test_an_i2v_checkpoint_counts_its_image_encoder_in_precompute():
    """Wan 2.1 I2V-14B: CLIP ViT-H/14 (0.63B) held by precompute beside UMT5 and the VAE; the transformer's image
    projections (16.4B in all, against the T2V 14B's 14.3B) by training."""
    i2v = estimate(EstimateConfig(model="wan", pretrained="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                                  buckets=["49x480x832"], rank=32))
    t2v = estimate(EstimateConfig(model="wan", pretrained="Wan-AI/Wan2.1-T2V-14B-Diffusers", buckets=["49x480x832"],
                                  rank=32))
    assert round(i2v.component("image_encoder").params / 1e9, 2) == 0.63
    assert i2v.precompute_bytes - t2v.precompute_bytes == i2v.component("image_encoder").params * 2
    assert i2v.component("transformer").params > t2v.component("transformer").params
    assert "text encoders + VAE + image encoder" in i2v.report()


def test_hunyuan_video_i2v_checkpoints_estimate_offline_with_the_llava():
    """HunyuanVideo-I2V's published checkpoints are known offline: their text encoder is the Llava (the Llama-3 8B
    text model, CLIP ViT-L/14-336's vision tower and the projector), held by precompute."""
    for name in ("hunyuanvideo-community/HunyuanVideo-I2V", "HunyuanVideo-I2V-33ch"):
        i2v = estimate(EstimateConfig(model="hunyuan_video", pretrained=name, buckets=["49x480x768"], rank=64))
        assert i2v.component("text_encoder").cls == "LlavaForConditionalGeneration"
    t2v = estimate(EstimateConfig(model="hunyuan_video", pretrained="hunyuanvideo-community/HunyuanVideo",
                                  buckets=["49x480x768"], rank=64))
    assert t2v.component("text_encoder").cls == "LlamaModel"
    assert i2v.precompute_bytes > t2v.precompute_bytes  # the vision tower, projector and LM head


# ------------------------------------------------------------------ long sequences: context parallelism, offload
WAN14B = dict(model="wan", pretrained="Wan-AI/Wan2.1-T2V-14B-Diffusers", buckets=["81x720x1280"])
HUNYUAN = dict(model="hunyuan_video", pretrained="hunyuan-video", buckets=["129x720x1280"])


@pytest.fixture(scope="module")
def wan14b_long():
    return estimate(EstimateConfig(**WAN14B))


def test_context_parallel_splits_the_video_tokens_and_adds_the_attentions_buffers(wan14b_long):
    """Wan 14B at 81x720x1280: 21 x 45 x 80 = 75600 video tokens and 512 text tokens, 40 blocks of 5120 (40 heads,
    MLP 13824). cp 2 holds half the video tokens and all the text in every block; Ulysses (40 heads divide 2, the
    default) adds its all-to-all copies of q, k, v and the output at the local size; ring gathers every peer's K/V,
    the whole sequence, whatever the degree. The weights are whole on each GPU."""
    (one,) = wan14b_long.buckets
    assert (one.video_tokens, one.text_tokens) == (75600, 512) and one.cp_attention == 0
    layers, hidden, ratio = 40, 5120, 13824 / 5120
    local = 75600 // 2 + 512
    ulysses = estimate(EstimateConfig(**WAN14B, cp_degree=2))
    (two,) = ulysses.buckets
    assert two.cp_attention == 8 * (76112 / 2) * hidden * 2
    assert two.activations_checkpointed == activation_bytes(layers, hidden, local, 1, ratio, True) + two.cp_attention
    assert two.activations_full == activation_bytes(layers, hidden, local, 1, ratio, False) + two.cp_attention
    assert ulysses.train_static == wan14b_long.train_static
    assert "each sequence split over 2 GPUs (ulysses)" in ulysses.report()
    assert "each GPU holds 37800 of the 75600 video tokens and the 512 text tokens" in ulysses.report()
    ring2, ring4 = (estimate(EstimateConfig(**WAN14B, cp_degree=n, cp_mode="ring")).buckets[0] for n in (2, 4))
    gathered = 2 * 76112 * hidden * 2  # K and V of the whole sequence, bf16
    assert ring2.cp_attention > gathered + 2 * (76112 / 2) * hidden * 2 and ring4.cp_attention > gathered
    assert ring4.activations_checkpointed < ring2.activations_checkpointed < one.activations_checkpointed


def test_activation_offload_keeps_one_block_and_its_input_on_the_gpu():
    """HunyuanVideo at 129x720x1280 (33 x 45 x 80 = 118800 video tokens + 256 text, 60 blocks of 3072): the GPU
    keeps one block's recompute and that block's input; every block's input (2 bytes per token per hidden unit)
    waits in pinned CPU memory."""
    plain = estimate(EstimateConfig(**HUNYUAN))
    offload = estimate(EstimateConfig(**HUNYUAN, activation_offload=True))
    (p,), (o,) = plain.buckets, offload.buckets
    tokens, hidden = 118800 + 256, 3072
    block_input = 2 * tokens * hidden
    assert o.activations_cpu == 60 * block_input and p.activations_cpu == 0
    assert o.activations_checkpointed == activation_bytes(1, hidden, tokens, 1, 4.0, False) + block_input
    assert p.activations_checkpointed - o.activations_checkpointed == pytest.approx(59 * block_input)
    report = offload.report()
    assert "offloading needs checkpointing" in report and f"{o.activations_cpu / 1e9:.2f} GB of the blocks' inputs" in (
        report)
    # torch's pinned allocator takes 1 GiB for each 0.73 GB input unless told to allocate large blocks exact
    assert f"a power of two by default ({60 * 2 ** 30 / 1e9:.2f} GB); PYTORCH_CUDA_ALLOC_CONF=" in report


def test_a_bucket_that_does_not_fit_is_told_the_least_that_makes_it_fit(wan14b_long):
    """The proposals are the estimate's own: each proposed layout fits that card when estimated, and one cp degree
    less does not. Wan 14B 81x720x1280 fits an 80 GB card as it is; on 48 GB, activation offload on one GPU or
    cp 4; on 24 GB no cp degree helps (the replicated bf16 weights are 28.6 GB), one GPU does with the activations
    and most blocks' weights in CPU memory; HunyuanVideo 129x720x1280 fits no card as it is."""

    def fits(gib, **kwargs):
        result = estimate(EstimateConfig(**WAN14B, **kwargs))
        return gib in result.fits(result.buckets[0])

    (b,) = wan14b_long.buckets
    assert wan14b_long.layouts_to_fit(b, 80) == ""
    assert wan14b_long.layouts_to_fit(b, 48) == "--activation-offload, or --cp-degree 4 (ulysses)"
    assert fits(48, activation_offload=True) and fits(48, cp_degree=4) and not fits(48, cp_degree=2)
    assert wan14b_long.layouts_to_fit(b, 24) == "--activation-offload --offload-blocks 31"
    assert fits(24, activation_offload=True, offload_blocks=31) and not fits(24, activation_offload=True,
                                                                              offload_blocks=30)
    assert not fits(24, cp_degree=16, activation_offload=True)
    assert "| 81x720x1280 | --activation-offload --offload-blocks 31 |" in wan14b_long.report()
    full = estimate(EstimateConfig(**WAN14B, training_type="full-finetune"))  # 8 bytes a weight, on every cp rank
    assert full.layouts_to_fit(full.buckets[0], 80).startswith("no cp degree: the weights and optimizer state alone")
    hunyuan = estimate(EstimateConfig(**HUNYUAN))
    (h,) = hunyuan.buckets
    assert hunyuan.fits(h) == []
    assert hunyuan.layouts_to_fit(h, 80) == "--activation-offload, or --cp-degree 2 (ulysses)"
    n = hunyuan.offload_to_fit(h, 24, hunyuan.activations.bytes(h.video_tokens, h.text_tokens, True, offload=True)[0])
    assert hunyuan.layouts_to_fit(h, 24) == f"--activation-offload --offload-blocks {n}"
    both = estimate(EstimateConfig(**HUNYUAN, activation_offload=True, offload_blocks=n))
    assert 24 in both.fits(both.buckets[0])


@pytest.mark.parametrize("kwargs,message", [
    ({**WAN14B, "cp_degree": 3, "cp_mode": "ulysses"}, "its 40 attention heads do not split 3 ways under Ulysses. "
                                                       "Degrees up to 16 that split it under ulysses: 2, 4, 5, 8, 10; "
                                                       "under ring: 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 15, 16."),
    ({**WAN14B, "cp_degree": 11}, "its 75600 video tokens do not split into 11 equal parts"),
    ({**WAN14B, "cp_mode": "zigzag"}, "--cp-mode 'zigzag' is not one of"),
    ({**WAN14B, "cp_mode": "ring"}, "--cp-mode ring: nothing is split at --cp-degree 1; add --cp-degree N"),
    ({**WAN14B, "cp_degree": 0}, "--cp-degree must be > 0"),
    ({**WAN14B, "cp_degree": 2, "offload_blocks": 4}, "--offload-blocks with --cp-degree 2: ft train does that in one"),
    ({**WAN14B, "cp_degree": 2, "layerwise_upcasting_modules": ["transformer"]}, "--layerwise-upcasting-modules with"),
    # what ft train refuses of a family, estimate refuses alike (train/context_parallel.py's check_cp_family)
    ({"model": "hunyuan_video", "pretrained": "hunyuanvideo-community/HunyuanVideo", "cp_degree": 2,
      "cp_mode": "ring"}, "--cp-mode ring: HunyuanVideo splits only with ulysses attention"),
    ({"model": "hunyuan_video_1_5", "pretrained": "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",
      "cp_degree": 2}, "ft has no context-parallel plan for HunyuanVideo 1.5 yet"),
    # CogVideoX's plan splits its 226 text tokens too: 4 divides this bucket's video tokens, not them
    ({"model": "cogvideox", "pretrained": "THUDM/CogVideoX-5b", "buckets": ["49x512x768"], "cp_degree": 4},
     "its 226 text tokens do not split into 4 equal parts"),
])
def test_layouts_that_cannot_split_are_refused_with_the_numbers_that_work(kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        estimate(EstimateConfig(**kwargs))


def test_the_flags_on_the_command_line():
    result = run_cli(["estimate", "--model", "wan", "--pretrained", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "--buckets",
                      "81x480x832", "--cp-degree", "2", "--cp-mode", "ring", "--activation-offload"])
    assert result.config.cp_degree == 2 and result.config.activation_offload
    assert "split over 2 GPUs (ring), activation offload" in result.report()
