"""The train stage against ft's all-in-one mode: the same step fed from shards (ft) or with the VAE and text
encoder loaded and run online in the same process (what a trainer without a precompute stage does).

    python bench/train_step.py [--config tiny|medium] [--steps 20] [--rows all|bare] [--out FILE]

Same model, batch, bucket, seed and step code (`ft.train.trainer.Trainer.optimizer_step`) both ways; online, the
"data" of a step is decoding the clips and running the encoders. Each way runs in its own process so its peak
memory is its own: RSS on a CPU, CUDA peak allocated and reserved on a GPU. Configurations:
- tiny: the test suite's CogVideoX (2 layers of width 32), 9x32x32 clips, batch 2;
- medium: CogVideoX at scaled-down widths of the real config (4 layers of width 512, 16 latent channels, a
  4-layer T5 of width 512, the real VAE layout at widths 32-128), 17x128x192 clips, batch 1. The largest that
  runs on a 2-core CPU in a few minutes; on a GPU, bench/gpu.sh measures the real sizes.

The bare rows set ft's step against its limit: the same transformer's forward, backward, gradient clipping and
AdamW step on one batch already in memory (no loader, no logging, no per-sample generators: `torch.randn` noise,
`torch.randint` timesteps and the CogVideoX objective inline), in one process and under DDP x2 (torchrun, gloo).
The two steps alternate in one process (ft, bare, bare, ft, ...) so that a change in the machine's load hits both;
the ratio is the median of the pairs' ratios. Written to bench/results/train_step_bare_<config>.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "tiny": {"bucket": (9, 32, 32), "batch": 2, "clips": 8},
    "medium": {"bucket": (17, 128, 192), "batch": 1, "clips": 6},
}
FP32 = ["--transformer-dtype", "fp32", "--vae-dtype", "fp32", "--text-encoder-dtype", "fp32"]


def build_medium(folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from ft.pipelines.tiny import t5_tokenizer

    torch.manual_seed(0)
    tokenizer = t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=512, d_kv=64, d_ff=1024, num_layers=4,
                                           num_heads=8, feed_forward_proj="gated-gelu", pad_token_id=0,
                                           eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKLCogVideoX(block_out_channels=(32, 64, 64, 128), latent_channels=16, layers_per_block=1,
                                 norm_num_groups=16, temporal_compression_ratio=4)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=8, attention_head_dim=64, in_channels=16,
                                              out_channels=16, time_embed_dim=512, text_embed_dim=512, num_layers=4,
                                              sample_width=24, sample_height=16, sample_frames=17,
                                              max_text_seq_length=226, use_rotary_positional_embeddings=True)
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                       rescale_betas_zero_snr=True, snr_shift_scale=1.0, timestep_spacing="trailing")
    CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                      scheduler=scheduler).save_pretrained(folder)
    return folder


def prepare(config: str, work: Path) -> None:
    from ft.cli.main import invoke
    from ft.cli.synthetic import make_shapes_dataset
    from ft.pipelines.registry import save_tiny_model

    c = CONFIGS[config]
    frames, height, width = c["bucket"]
    if config == "tiny":
        save_tiny_model("cogvideox", work / "model")
    else:
        build_medium(work / "model")
    make_shapes_dataset(work / "data", num_clips=c["clips"], frames=frames, sizes=((height, width),), num_images=0,
                        seed=0)
    invoke(["precompute", "--model", "cogvideox", "--pretrained", str(work / "model"), *FP32, "--dataset",
            str(work / "data"), "--out", str(work / "shards"), "--buckets", f"{frames}x{height}x{width}"],
           standalone=False)


def online_batches(trainer, work: Path, config: str):
    """Batches made as an all-in-one trainer makes them: decode, resize, VAE and text encoder, every step."""
    import torch

    from ft.precompute.datasets import load_dataset
    from ft.precompute.media import frame_indices, open_media, resize_center_crop
    from ft.train.loader import Batch

    spec, c = trainer.spec, CONFIGS[config]
    frames, height, width = c["bucket"]
    encoders = spec.load_text_encoders(trainer.cfg, trainer.device)
    vae = spec.load_component("vae", trainer.cfg, trainer.device)
    seq_len = spec.default_sequence_length(dict(trainer.transformer.config))
    items = load_dataset(work / "data")
    i = 0
    while True:
        chosen = [items[(i + j) % len(items)] for j in range(c["batch"])]
        i += c["batch"]
        clips = []
        for item in chosen:
            media = open_media(item.path)
            clip = resize_center_crop(media.read(frame_indices(media.num_frames, frames, "head", 1)), height, width)
            clips.append(clip.permute(1, 0, 2, 3))
        with torch.no_grad():
            latents = spec.encode_video(vae, torch.stack(clips))
            cond = spec.encode_prompts(encoders, [it.caption for it in chosen], seq_len)
        yield [Batch(latents, cond, [{"caption": it.caption} for it in chosen], [str(it.path) for it in chosen],
                     position={"batches": i // c["batch"]})]


def worker(mode: str, config: str, work: Path, steps: int) -> dict:
    import torch

    from ft.train.config import TrainConfig
    from ft.train.loader import background
    from ft.train.trainer import Trainer

    c = CONFIGS[config]
    cfg = TrainConfig(model="cogvideox", pretrained=str(work / "model"), transformer_dtype="fp32", vae_dtype="fp32",
                      text_encoder_dtype="fp32", shards=[str(work / "shards")], output_dir=str(work / f"out-{mode}"),
                      batch_size=c["batch"], rank=16, lora_alpha=16, report_to="none", seed=0, lr_warmup_steps=0)
    trainer = Trainer(cfg)
    batches = (background(trainer.stream.batches()) if mode == "shards"
               else online_batches(trainer, work, config))
    times, waits = [], []
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            metrics = trainer.optimizer_step(batches, step)
            times.append(time.perf_counter() - t0)
            waits.append(metrics["data_wait"])
    finally:
        batches.close()  # stops the reader thread before the interpreter exits
    warm = max(1, steps // 5)  # the first steps pay for lazy initialisation
    result = {"step_s": sum(times[warm:]) / len(times[warm:]), "wait_share": sum(waits[warm:]) / sum(times[warm:]),
              "peak_rss_gb": peak_rss_gb()}
    if torch.cuda.is_available():
        result["cuda_alloc_gb"] = torch.cuda.max_memory_allocated() / 1e9
        result["cuda_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    return result


def bare_step(trainer):
    """The step with nothing but the model: one in-memory batch, plain torch.randn noise, the objective inline."""
    import torch

    batch = next(trainer.stream.batches())[0].to(trainer.device)
    latents = trainer.spec.prepare_latents(batch.latents, trainer.vae_config, trainer.transformer_config,
                                           [torch.Generator().manual_seed(0)])
    embeds = batch.cond["prompt_embeds"]
    frames, height, width = latents.shape[1], latents.shape[3], latents.shape[4]
    rotary = trainer.spec.rotary_embeddings(trainer.transformer.config, frames, height, width, latents.device)
    scheduler, cfg = trainer.objective.scheduler, trainer.cfg
    alphas = scheduler.alphas_cumprod.to(latents.device)
    optimizer = torch.optim.AdamW(trainer.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay, eps=cfg.epsilon)

    def step() -> float:
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, t)
        output = trainer.transformer(hidden_states=noisy, encoder_hidden_states=embeds, timestep=t,
                                     image_rotary_emb=rotary, return_dict=False)[0]
        prediction = scheduler.get_velocity(output, noisy, t)
        weights = (1.0 / (1.0 - alphas[t])).reshape(-1, 1, 1, 1, 1)
        loss = (weights * (prediction - latents) ** 2).flatten(1).mean(1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def bare_worker(config: str, work: Path, steps: int) -> dict | None:
    """ft's step fed by its loader thread, ft's step on micro-batches read ahead into memory (the same code, no
    thread) and the bare step, in turn (every order of the three), in this process (one of 2 under torchrun: DDP)."""
    import itertools
    import os
    import statistics

    from ft.train import dist
    from ft.train.config import TrainConfig
    from ft.train.loader import background
    from ft.train.trainer import Trainer

    c = CONFIGS[config]
    cfg = TrainConfig(model="cogvideox", pretrained=str(work / "model"), transformer_dtype="fp32", vae_dtype="fp32",
                      text_encoder_dtype="fp32", shards=[str(work / "shards")],
                      output_dir=str(work / f"out-bare-{os.environ.get('RANK', '0')}-{time.time_ns()}"),
                      batch_size=c["batch"], rank=16, lora_alpha=16, report_to="none", seed=0, lr_warmup_steps=0,
                      train_steps=2 * steps + 10)
    trainer = Trainer(cfg)
    in_memory = iter(list(itertools.islice(trainer.stream.batches(), steps + 2)))
    batches = background(trainer.stream.batches())
    bare = bare_step(trainer)
    wall: dict[str, list[float]] = {"ft": [], "memory": [], "bare": []}
    cpu: dict[str, list[float]] = {"ft": [], "memory": [], "bare": []}
    n = 0

    def timed(name: str) -> None:
        nonlocal n
        c0, t0 = time.process_time(), time.perf_counter()
        if name == "bare":
            bare()
        else:
            n += 1
            trainer.optimizer_step(batches if name == "ft" else in_memory, n)
        wall[name].append(time.perf_counter() - t0)
        cpu[name].append(time.process_time() - c0)

    orders = list(itertools.permutations(wall))
    try:
        for i in range(steps + 2):  # the first 2 rounds pay for lazy initialisation
            for name in orders[i % len(orders)]:
                timed(name)
    finally:
        batches.close()
    times = {k: v[2:] for k, v in wall.items()}
    ratios = [a / b for a, b in zip(times["ft"], times["bare"], strict=True)]
    memory = [a / b for a, b in zip(times["memory"], times["bare"], strict=True)]
    result = {"ft_s": statistics.median(times["ft"]), "memory_s": statistics.median(times["memory"]),
              "bare_s": statistics.median(times["bare"]), "ratio": statistics.median(ratios),
              "memory_ratio": statistics.median(memory), "ratio_min": min(ratios), "ratio_max": max(ratios),
              "ft_cores": sum(cpu["ft"][2:]) / sum(times["ft"]),
              "bare_cores": sum(cpu["bare"][2:]) / sum(times["bare"]),
              "world": trainer.world.size}
    dist.destroy()
    return result if trainer.world.main else None


def run_bare(config: str, work: Path, steps: int) -> list[dict]:
    """The bare comparison in one process, then under torchrun as DDP x2."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = []
    for nproc in (1, 2):
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--standalone", "--nproc_per_node", "2"]
        threads = {} if nproc == 1 else {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
        out = subprocess.run([*launcher, __file__, "--worker", "bare", "--config", config, "--workdir", str(work),
                              "--steps", str(steps)], capture_output=True, text=True, env={**env, **threads})
        if out.returncode:
            raise SystemExit(f"the bare comparison on {nproc} process(es) failed:\n{out.stderr[-6000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def bare_table(config: str, steps: int, results: list[dict]) -> str:
    c = CONFIGS[config]
    lines = [f"ft's step against the bare step, `{config}` config ({'x'.join(map(str, c['bucket']))}, batch "
             f"{c['batch']} per process, LoRA r16, fp32): {steps} rounds after 2 warm-up rounds, each round the three "
             "steps in turn (every order) in each process; ratios are medians of the rounds' ratios", "",
             "| layout | ft s/step (loader thread) | ft, batches in memory | bare s/step | ft / bare | "
             "ft in memory / bare | ft / bare, range | cores used ft / bare |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = "1 process" if r["world"] == 1 else f"DDP x{r['world']}"
        lines.append(f"| {name} | {r['ft_s']:.4f} | {r['memory_s']:.4f} | {r['bare_s']:.4f} | {r['ratio']:.3f} | "
                     f"{r['memory_ratio']:.3f} | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} | "
                     f"{r['ft_cores']:.2f} / {r['bare_cores']:.2f} |")
    return "\n".join(lines)


def peak_rss_gb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries that across exec, so a
    worker would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def versions() -> str:
    import diffusers
    import torch
    import transformers

    return f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="Markdown file for the table (default: print only).")
    parser.add_argument("--rows", choices=("all", "encoders", "bare"), default="all",
                        help="encoders: shards against online encoders; bare: ft against the bare step; all: both")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/train_step_bare_*.md")
    parser.add_argument("--worker", choices=("shards", "online", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "bare":
        result = bare_worker(args.config, Path(args.workdir), args.steps)
        if result is not None:
            print(json.dumps(result))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.config, Path(args.workdir), args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(args.config, work)
        bare = bare_table(args.config, args.steps, run_bare(args.config, work, args.steps)) if (
            args.rows != "encoders") else None
        if bare is not None and args.rows == "bare":
            return report_bare(args, bare)
        results = {}
        for mode in ("shards", "online"):
            out = subprocess.run([sys.executable, __file__, "--worker", mode, "--config", args.config, "--workdir",
                                  str(work), "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    s, o = results["shards"], results["online"]
    memory = "cuda_reserved_gb" if "cuda_reserved_gb" in s else "peak_rss_gb"
    lines = [f"train step, `{args.config}` config ({'x'.join(map(str, CONFIGS[args.config]['bucket']))}, batch "
             f"{CONFIGS[args.config]['batch']}, LoRA r16, fp32), {args.steps} steps; {platform.machine()}, "
             f"{'CUDA' if 'cuda_reserved_gb' in s else 'CPU'}; {versions()}; {time.strftime('%Y-%m-%d')}", "",
             "| fed from | s/step | data wait share | peak memory (GB) |", "|---|---|---|---|"]
    for name, r in (("shards (ft)", s), ("online encoders (all-in-one)", o)):
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['wait_share']:.1%} | {r[memory]:.2f} |")
    lines.append(f"| ratio shards / online | {s['step_s'] / o['step_s']:.2f} | | {s[memory] / o[memory]:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    if bare is not None:
        report_bare(args, bare)


def report_bare(args: argparse.Namespace, table: str) -> None:
    if args.no_save:
        print(table)
        return
    from report import save_result

    save_result(f"train_step_bare_{args.config}", table)


if __name__ == "__main__":
    main()
