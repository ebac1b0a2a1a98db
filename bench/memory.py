"""Memory and disk of LoRA training at real model sizes, without downloading weights: `ft estimate` for each
known checkpoint, side by side.

    python bench/memory.py [--rank 64] [--no-save]

Every number comes from ft.cli.estimate (the components built from their real configs on the meta device;
the shard bytes of one sample written with ShardWriter). The table is printed and written to
bench/results/memory.md. Measured GPU peaks come from bench/gpu.sh.
"""

from __future__ import annotations

import argparse

from ft.cli.estimate import GB, EstimateConfig, estimate
from ft.pipelines.registry import SPECS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--no-save", action="store_true", help="print only; do not write bench/results/memory.md")
    args = parser.parse_args()
    lines = [f"LoRA rank {args.rank}, batch 1, each family's default bucket; `ft estimate --model M --pretrained P "
             f"--rank {args.rank}` gives each row in full", "",
             "| checkpoint | bucket | transformer | bf16 weights | LoRA params | LoRA+grads+AdamW (fp32) | "
             "ft train static | + activations, checkpointing on | encoders kept out of training | "
             "all-in-one static | disk per sample |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for family, ckpt in [(name, c) for name, spec in SPECS.items() for c in spec.checkpoints]:
        est = estimate(EstimateConfig(model=family, pretrained=ckpt.names[0], rank=args.rank))
        transformer = est.component("transformer").params
        lora = est.trainable_params
        bucket = est.buckets[0]
        encoders = " + ".join(f"{c.params / 1e9:.3f}B" for c in est.components if c.name != "transformer")
        lines.append(
            f"| {ckpt.display_name} | {bucket.bucket} | {transformer / 1e9:.3f}B | {transformer * 2 / GB:.2f} GB | "
            f"{lora / 1e6:.1f}M | {lora * 16 / GB:.2f} GB | {est.train_static_bytes / GB:.2f} GB | "
            f"{(est.train_static_bytes + bucket.activations_checkpointed) / GB:.2f} GB | "
            f"{est.precompute_bytes / GB:.2f} GB ({encoders}) | "
            f"{(est.train_static_bytes + est.precompute_bytes) / GB:.2f} GB | {bucket.disk_per_sample / 1e6:.2f} MB |")
    lines += ["", "Activations are `ft estimate`'s model, not a measurement."]
    body = "\n".join(lines)
    if args.no_save:
        print(body)
    else:
        from report import save_result

        save_result("memory", body)


if __name__ == "__main__":
    main()
