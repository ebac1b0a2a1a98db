"""Bringing an existing LoRA: files made here in the published layouts of other tools (diffusion-pipe, ai-toolkit,
musubi-tuner) load into `ft generate --lora` with the delta they hold, fused q/k/v included, and start a run with
`ft train --init-lora` exactly where the same adapter in diffusers' layout starts it; an unknown layout is one
message listing the layouts ft reads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ft.common.errors import UserError
from helpers import FP32, HUNYUAN_FP32, run_cli

RANK, ALPHA = 4, 2.0  # the files' alpha: scale 0.5


def pair(g: torch.Generator, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(RANK, cols, generator=g) * 0.2, torch.randn(rows, RANK, generator=g) * 0.2


def write(path, tensors: dict[str, torch.Tensor]):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def wan_files(tmp_path):
    """Wan 2.1's attention and MLP (tiny: 24 wide, MLP 32) as diffusion-pipe writes it (diffusion_model. + Wan-AI's
    names, peft's lora_A/lora_B, no alpha) and as musubi-tuner does (lora_unet_ + those names with _, lora_down /
    lora_up and alpha); with the deltas each gives the diffusers modules."""
    g = torch.Generator().manual_seed(0)
    names = {"self_attn.q": ("attn1.to_q", 24, 24), "self_attn.o": ("attn1.to_out.0", 24, 24),
             "cross_attn.v": ("attn2.to_v", 24, 24), "ffn.0": ("ffn.net.0.proj", 32, 24)}
    pipe_state, musubi, expected_pipe, expected_musubi = {}, {}, {}, {}
    for block in (0, 1):
        for original, (module, rows, cols) in names.items():
            down, up = pair(g, rows, cols)
            pipe_state[f"diffusion_model.blocks.{block}.{original}.lora_A.weight"] = down
            pipe_state[f"diffusion_model.blocks.{block}.{original}.lora_B.weight"] = up
            expected_pipe[f"blocks.{block}.{module}"] = up @ down
            flat = f"lora_unet_blocks_{block}_{original.replace('.', '_')}"
            musubi |= {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up,
                       f"{flat}.alpha": torch.tensor(ALPHA)}
            expected_musubi[f"blocks.{block}.{module}"] = up @ down * (ALPHA / RANK)
    return {"diffusion-pipe": (write(tmp_path / "wan_diffusion_pipe.safetensors", pipe_state), expected_pipe),
            "musubi-tuner": (write(tmp_path / "wan_musubi.safetensors", musubi), expected_musubi)}


def hunyuan_files(tmp_path):
    """HunyuanVideo (tiny: 20 wide, single-stream MLP 80) as musubi-tuner (lora_unet_, alpha) and diffusion-pipe
    (transformer. + tencent's names) write it: each fused projection trained as one module, one down-projection
    for all its parts."""
    g = torch.Generator().manual_seed(1)
    double, single = "transformer_blocks.0.", "single_transformer_blocks.0."
    fused = {"double_blocks.0.img_attn_qkv": [f"{double}attn.to_{p}" for p in "qkv"],
             "single_blocks.0.linear1": [*(f"{single}attn.to_{p}" for p in "qkv"), f"{single}proj_mlp"],
             "double_blocks.0.img_mod.linear": [f"{double}norm1.linear"],
             "double_blocks.0.txt_mlp.fc1": [f"{double}ff_context.net.0.proj"]}
    rows = {"double_blocks.0.img_attn_qkv": [20] * 3, "single_blocks.0.linear1": [20, 20, 20, 80],
            "double_blocks.0.img_mod.linear": [120], "double_blocks.0.txt_mlp.fc1": [80]}
    musubi, dpipe, expected_musubi, expected_dpipe = {}, {}, {}, {}
    for original, modules in fused.items():
        down, up = pair(g, sum(rows[original]), 20)
        flat = "lora_unet_" + original.replace(".", "_")
        musubi |= {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up,
                   f"{flat}.alpha": torch.tensor(ALPHA)}
        dpipe |= {f"transformer.{original}.lora_A.weight": down, f"transformer.{original}.lora_B.weight": up}
        for module, delta in zip(modules, (up @ down).split(rows[original]), strict=True):
            expected_musubi[module], expected_dpipe[module] = delta * (ALPHA / RANK), delta
    return {"musubi-tuner": (write(tmp_path / "hunyuan_musubi.safetensors", musubi), expected_musubi),
            "diffusion-pipe": (write(tmp_path / "hunyuan_diffusion_pipe.safetensors", dpipe), expected_dpipe)}


def ltx_files(tmp_path):
    """LTX-Video as ai-toolkit writes it: diffusion_model. + Lightricks' names (the attention's are diffusers')."""
    g = torch.Generator().manual_seed(2)
    state, expected = {}, {}
    for module in ("attn1.to_q", "attn2.to_k", "ff.net.2"):
        module = f"transformer_blocks.0.{module}"
        down, up = pair(g, 32, 128 if module.endswith("ff.net.2") else 32)
        state |= {f"diffusion_model.{module}.lora_A.weight": down, f"diffusion_model.{module}.lora_B.weight": up}
        expected[module] = up @ down
    return {"ai-toolkit": (write(tmp_path / "ltx_ai_toolkit.safetensors", state), expected)}


FILES = {"wan": (wan_files, FP32), "hunyuan_video": (hunyuan_files, HUNYUAN_FP32), "ltx_video": (ltx_files, FP32)}


def applied(transformer, expected: dict[str, torch.Tensor]) -> None:
    """Each module's adapter "ft" applies the expected delta; no other module has one."""
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and "ft" in module.lora_A:
            assert name in expected, f"{name} got an adapter the file does not have"
            delta = module.lora_B["ft"].weight @ module.lora_A["ft"].weight * module.scaling["ft"]
            torch.testing.assert_close(delta, expected.pop(name), atol=1e-6, rtol=1e-5, msg=name)
    assert not expected, f"not loaded: {sorted(expected)}"


@pytest.mark.parametrize("family", sorted(FILES))
def test_another_tools_lora_loads_with_ft_generate_lora(family, tmp_path, tiny_model):
    from ft.pipelines.registry import get_spec
    from ft.train.generate import GenerateConfig, load_pipeline_with_lora

    for path, expected in FILES[family][0](tmp_path).values():
        cfg = GenerateConfig(model=family, pretrained=str(tiny_model(family)), prompt="x", lora=str(path),
                             transformer_dtype="fp32")
        applied(load_pipeline_with_lora(get_spec(family), cfg, "cpu").transformer, dict(expected))


def test_ft_generate_makes_a_video_with_musubi_tuners_lora(tmp_path, tiny_wan):
    path, _ = wan_files(tmp_path)["musubi-tuner"]
    out = run_cli(["generate", "--model", "wan", "--pretrained", tiny_wan, *FP32, "--prompt", "a red circle",
                   "--lora", path, "--num-frames", "5", "--height", "32", "--width", "32", "--num-inference-steps",
                   "2", "--out", tmp_path / "video.mp4"])
    assert out.stat().st_size > 0


def test_init_lora_starts_the_adapter_at_the_files_delta(tmp_path, tiny_model):
    """Each family's other-tool files: the run's adapter (rank 4, its own alpha 8) takes the file's delta at the
    modules it has; a module of the run the file lacks starts at zero, as a fresh LoRA does."""
    from ft.pipelines.registry import get_spec
    from ft.train.lora import add_lora
    from ft.train.lora_formats import LoraPlan, config_modules

    for family, (make, _) in FILES.items():
        spec = get_spec(family)
        for path, expected in make(tmp_path).values():
            transformer = spec.tiny_components(0)["transformer"]
            fresh = next(m for m in config_modules(spec, dict(transformer.config)) if m not in expected
                         and "blocks.0." in m and spec.original_layout.counterpart(m))
            targets = [*sorted(expected), fresh]  # the file's modules, and one it lacks
            plan = LoraPlan.make(spec, dict(transformer.config), RANK, 8.0, targets, "tiny", "diffusers", str(path))
            add_lora(transformer, RANK, 8.0, targets, plan)
            for name, delta in expected.items():
                module = transformer.get_submodule(name)
                ours = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
                torch.testing.assert_close(ours, delta, atol=1e-6, rtol=1e-5)
            assert not transformer.get_submodule(fresh).lora_B["default"].weight.any()  # B = 0: a fresh LoRA


def train(model, shards, out, *extra, targets=("to_q", "to_out.0", "to_v", "ffn.net.0.proj"), rank=RANK):
    return run_cli(["train", "--model", "wan", "--pretrained", model, *FP32, "--shards", shards, "--output-dir", out,
                    "--batch-size", "2", "--lr-warmup-steps", "0", "--report-to", "none", "--train-steps", "2",
                    "--lr", "1e-3", "--seed", "0", "--rank", rank, "--lora-alpha", "8", "--target-modules", *targets,
                    *extra])


def test_a_run_from_musubi_tuners_lora_is_the_run_from_the_same_lora_in_diffusers_layout(tmp_path, tiny_wan,
                                                                                          wan_shards):
    musubi, expected = wan_files(tmp_path)["musubi-tuner"]
    diffusers_layout = write(tmp_path / "same.safetensors", {
        f"transformer.{m}.lora_{ab}.weight": t for m, delta in expected.items()
        for ab, t in zip("AB", _factor(load_file(musubi), m), strict=True)})
    a = train(tiny_wan, wan_shards, tmp_path / "a", "--init-lora", musubi)
    b = train(tiny_wan, wan_shards, tmp_path / "b", "--init-lora", diffusers_layout)
    assert a["first_loss"] == pytest.approx(b["first_loss"], rel=1e-6)
    fresh = train(tiny_wan, wan_shards, tmp_path / "fresh")
    assert abs(fresh["first_loss"] - a["first_loss"]) > 1e-4  # the LoRA it started from acts
    wa, wb = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors"), load_file(
        tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=1e-5)
    with pytest.raises(UserError, match="continue it with --rank 4"):
        train(tiny_wan, wan_shards, tmp_path / "c", "--init-lora", musubi, rank=8)
    with pytest.raises(UserError, match=r"adapts 6 module\(s\) this run's --target-modules do not"):
        train(tiny_wan, wan_shards, tmp_path / "d", "--init-lora", musubi, targets=("to_q",))


def _factor(state, module):
    """A diffusers module's (down, up * alpha / rank) in the musubi-tuner file."""
    names = {"attn1.to_q": "self_attn_q", "attn1.to_out.0": "self_attn_o", "attn2.to_v": "cross_attn_v",
             "ffn.net.0.proj": "ffn_0"}
    block, rest = module.split(".", 2)[1:]
    flat = f"lora_unet_blocks_{block}_{names[rest]}"
    return state[f"{flat}.lora_down.weight"], state[f"{flat}.lora_up.weight"] * (ALPHA / RANK)


def test_an_unknown_layout_is_one_message_listing_the_layouts_ft_reads(tmp_path, tiny_wan):
    path = write(tmp_path / "odd.safetensors", {"unet.down.0.lora.weight": torch.zeros(2, 2)})
    with pytest.raises(UserError, match=r"odd.safetensors: key unet.down.0.lora.weight .* ft reads: diffusers: .*"
                                        r"ComfyUI / original: .*kohya / musubi-tuner"):
        run_cli(["generate", "--model", "wan", "--pretrained", tiny_wan, *FP32, "--prompt", "x", "--lora", path])
    path = write(tmp_path / "odd2.safetensors", {"model.layers.0.lora_A.weight": torch.zeros(2, 2),
                                                  "model.layers.0.lora_B.weight": torch.zeros(2, 2)})
    with pytest.raises(UserError, match=r"odd2.safetensors: its keys \(e.g. model.layers.0\) are in no LoRA layout "
                                        r"ft reads for Wan. ft reads: diffusers"):
        run_cli(["generate", "--model", "wan", "--pretrained", tiny_wan, *FP32, "--prompt", "x", "--lora", path])
    hunyuan = write(tmp_path / "other_model.safetensors", {
        "diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight": torch.zeros(2, 2),
        "diffusion_model.double_blocks.0.img_attn_qkv.lora_B.weight": torch.zeros(2, 2)})
    with pytest.raises(UserError, match=r"other_model.safetensors: in the comfyui layout, 1 of its modules are not in "
                                        r"this Wan transformer \(e.g. diffusion_model.double_blocks.0.img_attn_qkv\)"):
        run_cli(["generate", "--model", "wan", "--pretrained", tiny_wan, *FP32, "--prompt", "x", "--lora", hunyuan])
