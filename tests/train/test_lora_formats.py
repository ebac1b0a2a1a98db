"""The LoRA files ft writes, read back by diffusers' own loaders (train/lora_formats.py): for each family, the
ComfyUI-layout file loaded by `load_lora_weights` (diffusers' Wan, HunyuanVideo and LTX-Video readers of
non-diffusers LoRAs) applies, module by module, the delta ft trained (B @ A * alpha / rank; fused modules
included) and gives the pipeline output of the diffusers-layout file of the same adapter, on tiny random models of
the real architectures (HunyuanVideo's single-stream blocks at their real width too: diffusers' reader splits
`linear1` at 3072). Also: the metadata, kohya's layout (Wan), and a target with no original key refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ft.common.errors import UserError
from ft.pipelines.registry import get_spec
from ft.train.generate import pipeline_embeddings
from ft.train.lora import add_lora, lora_state_dict
from ft.train.lora_formats import FILE_NAMES, LoraPlan

RANK, ALPHA = 4, 8.0  # scale 2: a folded alpha that was dropped would show
# pipeline output (fp32 latents after 2 denoising steps, values up to about 4.4) of the ComfyUI (and kohya) file
# against the diffusers file, and of that against ft's live adapter: measured max abs differences 0 (Cog, LTX, Wan)
# to 4.8e-7 (HunyuanVideo: the fused modules' rank-3r products only round differently)
ATOL, RTOL = 1e-5, 1e-5
HUNYUAN_TINY_TARGETS = [r"(transformer_blocks.*(to_q|to_k|to_v|to_out.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|"
                        r"norm1.linear|norm1_context.linear|ff.net.0.proj|ff_context.net.2))|"
                        r"(single_transformer_blocks.*(proj_out|norm.linear))"]
CASES = {  # case: (family, target modules, layouts written besides diffusers')
    "cogvideox": ("cogvideox", [], ("comfyui",)),
    "ltx_video": ("ltx_video", ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"], ("comfyui",)),
    "wan": ("wan", ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"], ("comfyui", "kohya")),
    # the tiny HunyuanVideo is 20 wide: its double-stream blocks (fused img/txt q, k, v) and single-stream ones
    # outside linear1
    "hunyuan_video": ("hunyuan_video", HUNYUAN_TINY_TARGETS, ("comfyui",)),
    # single-stream blocks at the real width, the default targets: q, k, v fused into linear1 with the MLP's rows
    "hunyuan_video_wide": ("hunyuan_video", [], ("comfyui",)),
}


def load(pipe, folder, layout: str, case: str) -> None:
    """`load_lora_weights` of the file, as a user of diffusers calls it. The wide HunyuanVideo has no double-stream
    block, and `HunyuanVideoLoraLoaderMixin.lora_state_dict` takes a file for the original layout only when a key
    holds img_attn_qkv (a double-stream block's): its file goes through the converter that test would choose."""
    path = folder / FILE_NAMES[layout]
    if case == "hunyuan_video_wide" and layout == "comfyui":
        from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers
        from safetensors.torch import load_file

        pipe.load_lora_weights(_convert_hunyuan_video_lora_to_diffusers(load_file(path)), adapter_name=layout)
    else:
        pipe.load_lora_weights(folder, weight_name=path.name, adapter_name=layout)


def components(case: str) -> dict:
    family = CASES[case][0]
    parts = get_spec(family).tiny_components(0)
    if case == "hunyuan_video_wide":
        from diffusers import HunyuanVideoTransformer3DModel

        torch.manual_seed(1)
        parts["transformer"] = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=24, attention_head_dim=128, num_layers=0,
            num_single_layers=1, num_refiner_layers=0, mlp_ratio=0.01, patch_size=1, patch_size_t=1,
            guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(16, 56, 56))
    return parts


def sample(spec, pipe, seed: int = 0) -> torch.Tensor:
    """The pipeline's latents after 2 steps from fixed random conditioning (the spec's conditioning layout)."""
    config = dict(pipe.transformer.config)
    length = 8 if spec.check_sequence_length(8, config) is None else spec.default_sequence_length(config)
    g = torch.Generator().manual_seed(seed + 1)
    cond = {t.name: torch.ones(t.shape(config, length), dtype=torch.bool) if t.dtype == "bool"
            else torch.randn(t.shape(config, length), generator=g) for t in spec.conditioning}
    embeds = pipeline_embeddings(cond, None, "cpu", torch.float32)
    with torch.no_grad():
        out = pipe(num_frames=9, height=32, width=32, num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator().manual_seed(seed), **embeds, **spec.pipeline_call_kwargs(config))
    return out.frames


def trained_lora(case: str, tmp_path):
    """The case's tiny model with a random (as if trained) adapter, its files written by ft, and the base."""
    family, targets, layouts = CASES[case]
    spec, parts = get_spec(family), components(case)
    transformer = parts["transformer"]
    base = copy.deepcopy(transformer)
    params = add_lora(transformer, RANK, ALPHA, targets or spec.default_lora_targets)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora_format = "both" if layouts == ("comfyui",) else "comfyui"
    plan = LoraPlan.make(spec, dict(transformer.config), RANK, ALPHA, targets, "tiny", lora_format)
    for layout in ("diffusers", *layouts):  # one plan per extra layout, as --lora-format gives them
        LoraPlan.make(spec, dict(transformer.config), RANK, ALPHA, targets, "tiny", layout).write(
            tmp_path, lora_state_dict(transformer), steps=3)
    return spec, parts, transformer, base, plan


def ft_deltas(transformer, adapted: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for module in adapted:
        layer = transformer.get_submodule(module)
        out[module] = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    return out


def applied_delta(transformer, module: str, adapter: str) -> torch.Tensor:
    layer = transformer.get_submodule(module)
    return layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight * layer.scaling[adapter]


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_comfyui_file_loaded_by_diffusers_is_the_lora_ft_trained(case, tmp_path):
    spec, parts, transformer, base, plan = trained_lora(case, tmp_path)
    layouts = ("diffusers", *CASES[case][2])
    pipe = spec.build_pipeline(base, parts["vae"], parts["scheduler"])
    for layout in layouts:
        load(pipe, tmp_path, layout, case)
    expected = ft_deltas(transformer, plan.adapted)
    with torch.no_grad():
        for module, delta in expected.items():
            for layout in layouts:
                torch.testing.assert_close(applied_delta(pipe.transformer, module, layout), delta, atol=1e-6,
                                           rtol=1e-5, msg=f"{layout}: {module}")
    outputs = {}
    for layout in layouts:
        pipe.set_adapters([layout])
        outputs[layout] = sample(spec, pipe)
    pipe.disable_lora()
    without = sample(spec, pipe)
    assert (outputs["diffusers"] - without).abs().max() > 1e-3  # the LoRA acts
    ours = sample(spec, spec.build_pipeline(transformer, parts["vae"], parts["scheduler"]))  # ft's live adapter
    torch.testing.assert_close(outputs["diffusers"], ours, atol=ATOL, rtol=RTOL)
    for layout in layouts[1:]:
        torch.testing.assert_close(outputs[layout], outputs["diffusers"], atol=ATOL, rtol=RTOL)


def test_the_files_say_what_they_are(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    trained_lora("wan", tmp_path)
    for layout, name in FILE_NAMES.items():
        with safe_open(str(tmp_path / name), framework="pt") as f:
            meta = f.metadata()
        assert meta["ft.family"] == "wan" and meta["ft.layout"] == layout and meta["ft.base_model"] == "tiny"
        assert (meta["ft.rank"], meta["ft.alpha"], meta["ft.steps"]) == ("4", "8", "3")
        assert json.loads(meta["ft.target_modules"]) == CASES["wan"][1] and meta["ft.version"]
        assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["modelspec.architecture"]) == ("4", "8",
                                                                                                     "wan/lora")
        assert ("lora_adapter_metadata" in meta) == (layout == "diffusers")  # diffusers would apply its alpha again
    comfy, kohya = load_file(tmp_path / FILE_NAMES["comfyui"]), load_file(tmp_path / FILE_NAMES["kohya"])
    assert "diffusion_model.blocks.1.cross_attn.o.lora_B.weight" in comfy and not any("alpha" in k for k in comfy)
    assert float(kohya["lora_unet_blocks_1_ffn_2.alpha"]) == ALPHA


def test_a_target_without_an_original_key_is_refused_when_the_run_starts(tmp_path):
    from diffusers import HunyuanVideoTransformer3DModel  # noqa: F401  (the class the spec names)

    spec = get_spec("hunyuan_video")
    config = dict(spec.tiny_components(0)["transformer"].config)
    with pytest.raises(UserError, match=r"norm_out\.linear \(the original final_layer"):
        LoraPlan.make(spec, config, RANK, ALPHA, ["norm_out.linear", "to_q"], "tiny", "both")
    assert LoraPlan.make(spec, config, RANK, ALPHA, ["(norm_out.linear)"], "tiny", "diffusers").adapted == [
        "norm_out.linear"]
    with pytest.raises(UserError, match="no kohya layout"):
        LoraPlan.make(spec, config, RANK, ALPHA, [], "tiny", "kohya")
    with pytest.raises(UserError, match="matches no module"):
        LoraPlan.make(spec, config, RANK, ALPHA, ["nothing_here"], "tiny", "both")
