"""The original-checkpoint layouts of the families' LoRAs (pipelines/lora_keys.py), checked against diffusers' own
converters: the module names of each table are those diffusers' full-checkpoint converter maps back onto the
diffusers modules (fused q/k/v row order included), at the real model sizes (built on the meta device); a fused
LoRA splits back exactly; and diffusers' HunyuanVideo LoRA reader (what `load_lora_weights` calls on an original-
layout file) applies, module by module, the delta ft trained."""

from __future__ import annotations

import re

import pytest
import torch

from ft.pipelines.lora_keys import LoraPair, from_original, original_index, to_original
from ft.pipelines.registry import get_spec

# the published transformer configs (the diffusers defaults are the real sizes; Wan with its I2V image layers)
REAL = {"wan": {"image_dim": 1280, "added_kv_proj_dim": 5120}, "hunyuan_video": {}, "ltx_video": {}}
CONVERTERS = {"wan": "convert_wan_transformer_to_diffusers",
              "hunyuan_video": "convert_hunyuan_video_transformer_to_diffusers",
              "ltx_video": "convert_ltx_transformer_checkpoint_to_diffusers"}
# modules with an original counterpart that no single LoRA key carries (the reason is in the family's table)
REFUSED = {"wan": set(), "ltx_video": set(),
           "hunyuan_video": {"norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
                             "time_text_embed.timestep_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
                             "time_text_embed.guidance_embedder.linear_2",
                             "context_embedder.time_text_embed.timestep_embedder.linear_1",
                             "context_embedder.time_text_embed.timestep_embedder.linear_2",
                             "context_embedder.time_text_embed.text_embedder.linear_1",
                             "context_embedder.time_text_embed.text_embedder.linear_2"}}


def real_modules(family: str) -> dict[str, int]:
    """Every LoRA-able module (Linear, Conv) of the family's real-size transformer, with its output rows."""
    from accelerate import init_empty_weights

    spec = get_spec(family)
    with init_empty_weights():
        model = spec.component_class("transformer")(**REAL[family])
    return {name: getattr(m, "out_features", None) or m.out_channels for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d | torch.nn.Conv3d)}


@pytest.mark.parametrize("family", sorted(CONVERTERS))
def test_the_original_names_are_those_diffusers_converts_to_each_module(family):
    """An original-layout checkpoint built from ft's table (fused modules as their parts' rows stacked) is turned
    back by diffusers' full-checkpoint converter into exactly the diffusers modules' weights; the keys of ft's
    ComfyUI file are exactly those original modules."""
    import diffusers.loaders.single_file_utils as single_file

    layout, modules = get_spec(family).original_layout, real_modules(family)
    weights = {m: torch.arange(rows, dtype=torch.float32)[:, None] + 1e6 * i for i, (m, rows) in
               enumerate(modules.items())}
    original: dict[str, torch.Tensor] = {}
    refused = set()
    for module in modules:
        where = layout.counterpart(module)
        if where is None:
            refused.add(module)
        elif where.index is None:
            original[where.original + ".weight"] = weights[module]
        elif where.index == 0:
            original[where.original + ".weight"] = torch.cat([weights[m] for m in where.group])
    assert refused == REFUSED[family]
    converted = getattr(single_file, CONVERTERS[family])(dict(original))
    mapped = {m: w for m, w in weights.items() if m not in refused}
    assert sorted(converted) == sorted(m + ".weight" for m in mapped)
    for module, weight in mapped.items():
        assert torch.equal(converted[module + ".weight"], weight), module
    # and the ComfyUI file of a LoRA on every mapped module: each key is one of those original modules, with its rows
    from ft.train.lora_formats import original_state

    state, _ = original_state(get_spec(family), random_pairs(modules, list(mapped), rank=1), modules, "comfyui")
    ups = {k.removeprefix(layout.prefix).removesuffix(".lora_B.weight"): v for k, v in state.items()
           if k.endswith(".lora_B.weight")}
    assert all(k.startswith(layout.prefix) for k in state) and len(state) == 2 * len(ups)
    assert sorted(ups) == sorted(k.removesuffix(".weight") for k in original)
    assert all(ups[name].shape[0] == original[name + ".weight"].shape[0] for name in ups)


def test_a_module_without_an_original_counterpart_has_a_reason():
    layout = get_spec("hunyuan_video").original_layout
    assert "shift, scale" in layout.why_not("norm_out.linear")
    assert "no module" in layout.why_not("transformer_blocks.0.attn.norm_q")
    assert layout.why_not("single_transformer_blocks.3.attn.to_k") is None


def random_pairs(modules: dict[str, int], names: list[str], rank: int, seed: int = 0) -> dict[str, LoraPair]:
    """Adapters of `rank` on `names` (inputs of width 8: the layout maps output rows only), scale 2."""
    g = torch.Generator().manual_seed(seed)
    return {m: LoraPair(torch.randn(rank, 8, generator=g), torch.randn(modules[m], rank, generator=g), 2.0)
            for m in names}


def hunyuan_targets(modules: dict[str, int]) -> list[str]:
    layout = get_spec("hunyuan_video").original_layout
    return [m for m in modules if layout.counterpart(m) is not None and not m.startswith(("img_in", "x_embedder"))]


def test_a_fused_lora_is_exact_and_splits_back_into_its_parts():
    """HunyuanVideo (real width): q, k, v (and the single blocks' MLP input) become one LoRA per fused module whose
    rows carry each part's delta; read back with the part ranks ft records, or without them (another tool's file),
    each part's delta is its own, and a part never trained stays without an adapter."""
    layout, modules = get_spec("hunyuan_video").original_layout, real_modules("hunyuan_video")
    names = [m for m in hunyuan_targets(modules) if not m.endswith("proj_mlp")]
    pairs = random_pairs(modules, names, rank=3)
    original, ranks = to_original(layout, pairs, modules)
    assert ranks["single_blocks.0.linear1"] == [3, 3, 3, 0] and ranks["double_blocks.5.img_attn_qkv"] == [3, 3, 3]
    linear1 = original["single_blocks.0.linear1"]
    assert linear1.rank == 9 and linear1.up.shape == (3 * 3072 + 12288, 9) and linear1.scale == 1.0
    assert torch.equal(linear1.up[3 * 3072:], torch.zeros(12288, 9))  # the MLP part: zero rows
    index = original_index(layout, list(modules))
    for recorded in (ranks, None):
        back = from_original(index, original, modules, recorded)
        assert sorted(back) == sorted(names)
        for module in names:
            torch.testing.assert_close(back[module].delta(), pairs[module].delta(), rtol=1e-6, atol=1e-5)
            assert back[module].rank == 3


def test_a_fused_lora_with_a_shared_down_projection_gives_each_part_its_rows():
    """musubi-tuner and diffusion-pipe train the fused module itself: one down-projection for q, k and v."""
    layout, modules = get_spec("hunyuan_video").original_layout, real_modules("hunyuan_video")
    g = torch.Generator().manual_seed(1)
    fused = LoraPair(torch.randn(4, 8, generator=g), torch.randn(3 * 3072, 4, generator=g), 0.5)
    back = from_original(original_index(layout, list(modules)), {"double_blocks.0.img_attn_qkv": fused}, modules)
    assert sorted(back) == [f"transformer_blocks.0.attn.to_{p}" for p in "kqv"]
    stacked = torch.cat([back[f"transformer_blocks.0.attn.to_{p}"].delta() for p in "qkv"])
    torch.testing.assert_close(stacked, fused.delta())


def test_diffusers_hunyuan_lora_reader_applies_the_delta_ft_trained():
    """diffusers' HunyuanVideo reader of original-layout LoRAs (the converter `load_lora_weights` calls on such a
    file; its single-block split assumes the real width, 3072) turns ft's original-layout LoRA into adapters whose
    deltas (scale 1: the alpha is folded in) are ft's, fused modules included. Not the token refiner's q/k/v: that
    reader splits the refiner's fused down-projection by rows as if it were a weight (ComfyUI applies it whole)."""
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    layout, modules = get_spec("hunyuan_video").original_layout, real_modules("hunyuan_video")
    blocks = ("transformer_blocks.0.", "single_transformer_blocks.0.", "context_embedder.", "proj_out", "time_text")
    names = [m for m in hunyuan_targets(modules) if m.startswith(blocks)
             and not re.fullmatch(r"context_embedder\..*\.attn\.to_[qkv]", m)]
    pairs = random_pairs(modules, names, rank=2, seed=3)
    original, _ = to_original(layout, pairs, modules)
    state = {}
    for name, pair in original.items():
        state[f"diffusion_model.{name}.lora_A.weight"] = pair.down
        state[f"diffusion_model.{name}.lora_B.weight"] = pair.folded_up()
    converted = _convert_hunyuan_video_lora_to_diffusers(state)
    assert sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted}) == sorted(names)
    for module in names:
        down, up = converted[f"transformer.{module}.lora_A.weight"], converted[f"transformer.{module}.lora_B.weight"]
        torch.testing.assert_close(up @ down, pairs[module].delta(), rtol=1e-6, atol=1e-5)
