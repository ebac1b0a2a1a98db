"""Memory and disk of CogVideoX LoRA training with ft, at real model sizes, without downloading weights.

    python bench/memory.py              # weights, LoRA, optimizer and shard sizes (any machine, seconds)
    python bench/memory.py --measure    # on a CUDA machine: also the peak GPU memory of one training step

Models are built from their real configs under accelerate.init_empty_weights (no memory, no download): the
diffusers defaults of CogVideoXTransformer3DModel are CogVideoX-2b; 48 heads x 42 layers with rotary embeddings
is CogVideoX-5b. Shard bytes are measured by writing one sample of the real shapes with ft's ShardWriter.
With --measure, random weights are materialised on the GPU and one LoRA training step (forward, backward,
AdamW) runs through ft's own ModelSpec.forward; torch.cuda.max_memory_allocated is reported.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

GB = 1e9
VARIANTS = {
    "CogVideoX-2b": {},
    "CogVideoX-5b": {"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True},
}
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")


def build(kwargs: dict, empty: bool = True):
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel

    if empty:
        with init_empty_weights():
            return CogVideoXTransformer3DModel(**kwargs)
    return CogVideoXTransformer3DModel(**kwargs)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_params(transformer, rank: int) -> int:
    from peft import LoraConfig

    from ft.pipelines.registry import get_spec

    targets = get_spec("cogvideox").default_lora_targets
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    return sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n)


def encoder_params() -> tuple[int, int]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel

    with init_empty_weights():
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        vae = AutoencoderKLCogVideoX()
    return count(t5), count(vae)


def shard_bytes(frames: int, height: int, width: int) -> int:
    from ft.common.shards import ShardWriter

    latent = {"mean": torch.zeros(16, (frames - 1) // 4 + 1, height // 8, width // 8, dtype=torch.bfloat16)}
    latent["logvar"] = latent["mean"].clone()
    cond = {"prompt_embeds": torch.zeros(226, 4096, dtype=torch.bfloat16)}
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(tmp, max_samples=1)
        writer.write("k", {"latents": latent, "cond": cond}, {"bucket": [frames, height, width]})
        return writer.completed[0].bytes


def measure_step(kwargs: dict, rank: int, frames: int, height: int, width: int, checkpointing: bool) -> float:
    from diffusers import CogVideoXDPMScheduler

    from ft.pipelines.registry import get_spec
    from ft.train.lora import add_lora

    spec = get_spec("cogvideox")
    torch.cuda.reset_peak_memory_stats()
    transformer = build(kwargs, empty=False).to("cuda", torch.bfloat16)
    params = add_lora(transformer, rank, rank, spec.default_lora_targets)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = CogVideoXDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      snr_shift_scale=3.0 if kwargs else 1.0)
    lat = (frames - 1) // 4 + 1
    latents = torch.randn(1, lat, 16, height // 8, width // 8, device="cuda")
    cond = {"prompt_embeds": torch.randn(1, 226, 4096, device="cuda")}
    t = torch.tensor([500], device="cuda")
    pred, target, w = spec.forward(transformer, scheduler, latents, cond, torch.randn_like(latents), t,
                                   torch.bfloat16)
    (w.float() * (pred - target) ** 2).mean().backward()
    optimizer.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GB
    del transformer, optimizer, params
    torch.cuda.empty_cache()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--bucket", default="49x480x720")
    parser.add_argument("--measure", action="store_true", help="run one training step on the GPU")
    args = parser.parse_args()
    frames, height, width = (int(x) for x in args.bucket.split("x"))
    started = time.time()
    t5, vae = encoder_params()
    print(f"| model | transformer params | bf16 weights | LoRA r{args.rank} params | LoRA+grads+AdamW (fp32) | "
          f"ft train static | T5-XXL + VAE kept out of training |")
    print("|---|---|---|---|---|---|---|")
    for name, kwargs in VARIANTS.items():
        transformer = build(kwargs)
        p = count(transformer)
        lp = lora_params(transformer, args.rank)
        weights, lora = p * 2 / GB, lp * 16 / GB
        print(f"| {name} | {p / 1e9:.3f}B | {weights:.2f} GB | {lp / 1e6:.1f}M | {lora:.2f} GB | "
              f"{weights + lora:.2f} GB | {(t5 + vae) * 2 / GB:.2f} GB ({t5 / 1e9:.2f}B + {vae / 1e9:.3f}B) |")
    per_sample = shard_bytes(frames, height, width)
    print(f"\nshard bytes per {args.bucket} sample (latent mean+logvar, T5 embeddings, bf16): "
          f"{per_sample / 1e6:.2f} MB; 1000 clips = {per_sample * 1000 / GB:.2f} GB")
    if args.measure:
        if not torch.cuda.is_available():
            raise SystemExit("--measure needs a CUDA device")
        print("\n| model | bucket | gradient checkpointing | peak GPU memory, one LoRA step |\n|---|---|---|---|")
        for name, kwargs in VARIANTS.items():
            for ckpt in (True, False):
                peak = measure_step(kwargs, args.rank, frames, height, width, ckpt)
                print(f"| {name} | {args.bucket} | {'on' if ckpt else 'off'} | {peak:.2f} GB |")
    print(f"\n({time.time() - started:.1f}s on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'})")


if __name__ == "__main__":
    main()
