"""What each rank holds, and what a step costs, in every data-parallel layout of `ft train`.

    python bench/dist.py [--config tiny|medium] [--steps 4] [--layouts all|1,ddp2,fsdp2,ddp4,fsdp4,hsdp2x2]
    python bench/dist.py --cp [--config medium] [--cp-buckets 17x128x192,33x128x192,33x128x384]

For LoRA and full finetune, each layout is one real torchrun launch (`python -m torch.distributed.run --standalone
--nproc_per_node N bench/dist.py --worker ...`, gloo on the CPU, fp32; the 1-process layout a plain process) of
bench/train_step.py's CogVideoX (`medium`: 4 layers of width 512 at 17x128x192; `tiny`: the test model at 9x32x32),
batch 1 per rank. Every rank builds ft's
own Trainer from a TrainConfig (`--dp-degree`/`--dp-shards` as the layout says), takes `--warmup` + `--steps`
optimizer steps through `Trainer.optimizer_step` fed by the shard loader, then measures from its live tensors:
- weights: every parameter of the transformer it holds (under FSDP2 the local shard of each DTensor, `to_local()`),
  and of those the trainable ones;
- gradients: after one more backward (the gradients an optimizer step sees; under FSDP2 their local shards);
- optimizer state: every tensor in the optimizer's state (AdamW's two moments and step counters);
and writes them with its median s/step to a JSON file of its own; the table shows the largest rank (and the
smallest where ranks differ). s/step is per optimizer step of `batch x world` samples; samples/s is set against
the 1-process run. Each process gets cores // processes intra-op threads (at least 1): on a 2-core machine the 4
process layouts are oversubscribed (4 processes on 2 cores), so their times measure contention, not scaling.

`--cp`: the context-parallel rows instead (LoRA): for each bucket of `--cp-buckets` (one sequence length each, its
own shard set), 1 process, cp 2 with Ulysses and cp 2 with ring attention (`--cp-degree 2 --cp-mode ...`, one
sample per optimizer step in each), with the activations a rank saves for its backward: the bytes of every tensor
autograd saves during one forward (torch.autograd.graph.saved_tensors_hooks, each storage counted once, the
parameters' own left out), and the s/step against 1 process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ft.common.shards import bucket_name

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ (report, train_step), also under torchrun

LAYOUTS = {  # name: (label, processes, dp_degree, dp_shards)
    "1": ("1 process", 1, 1, 1),
    "ddp2": ("DDP x2", 2, 2, 1),
    "fsdp2": ("FSDP2 x2", 2, 1, 2),
    "ddp4": ("DDP x4", 4, 4, 1),
    "fsdp4": ("FSDP2 x4", 4, 1, 4),
    "hsdp2x2": ("HSDP 2x2", 4, 2, 2),
}
TRAINING = {"lora": "LoRA r16", "full-finetune": "full finetune"}
CP_LAYOUTS = {  # name: (label, processes, cp degree, cp mode)
    "1": ("1 process", 1, 1, None),
    "cp2u": ("cp 2 Ulysses", 2, 2, "ulysses"),
    "cp2r": ("cp 2 ring", 2, 2, "ring"),
}


def tensor_bytes(tensor) -> int:
    """Bytes this rank holds of `tensor`: the local shard of a DTensor, the tensor itself otherwise."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def saved_activation_bytes(trainer, batch) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of `batch` (each storage once, the
    parameters and buffers left out), then that backward."""
    import torch

    own = {(t.to_local() if hasattr(t, "to_local") else t).untyped_storage().data_ptr()  # FSDP2: DTensors
           for t in [*trainer.transformer.parameters(), *trainer.transformer.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own and tensor.device.type != "meta":
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = trainer.sample_losses(batch, batch.position["batches"]).mean()
    loss.backward()
    return sum(saved.values())


def worker(args: argparse.Namespace) -> None:
    """One rank: train `--warmup` + `--steps` optimizer steps with ft's Trainer, measure, write rank-N.json."""
    import torch

    from ft.train import dist
    from ft.train.config import TrainConfig
    from ft.train.loader import background
    from ft.train.parallel import set_gradient_sync
    from ft.train.trainer import Trainer

    work = Path(args.workdir)
    if args.cp:
        replicas, shards, (_, _, cp_degree, cp_mode) = 1, 1, CP_LAYOUTS[args.layout]
        data, out = work / f"shards-{args.bucket}", work / f"out-{args.layout}-{args.bucket}"
    else:
        (_, _, replicas, shards), cp_degree, cp_mode = LAYOUTS[args.layout], 1, None
        data, out = work / "shards", work / f"out-{args.layout}-{args.training}"
    total_steps = args.warmup + args.steps
    lora = {"rank": 16, "lora_alpha": 16} if args.training == "lora" else {}
    cfg = TrainConfig(model="cogvideox", pretrained=str(work / "model"), transformer_dtype="fp32", vae_dtype="fp32",
                      text_encoder_dtype="fp32", shards=[str(data)], output_dir=str(out), batch_size=1,
                      training_type=args.training, **lora, lr=1e-5, report_to="none", seed=0,
                      lr_warmup_steps=0, train_steps=total_steps + 1, dp_degree=replicas, dp_shards=shards,
                      cp_degree=cp_degree, cp_mode=cp_mode)
    trainer = Trainer(cfg)
    batches = background(trainer.stream.batches())
    times = []
    try:
        for step in range(1, total_steps + 1):
            t0 = time.perf_counter()
            trainer.optimizer_step(batches, step)
            times.append(time.perf_counter() - t0)
        # the gradients of one more backward, as the optimizer step sees them (optimizer_step frees them after)
        batch = next(batches)[0].to(trainer.device)
        set_gradient_sync(trainer.transformer, trainer.layout, True)
        activations = saved_activation_bytes(trainer, batch)
        grads = sum(tensor_bytes(p.grad) for p in trainer.params if p.grad is not None)
        trainer.state.optimizer.zero_grad(set_to_none=True)
    finally:
        batches.close()
    optimizer_state = sum(tensor_bytes(v) for state in trainer.state.optimizer.state.values()
                          for v in state.values() if torch.is_tensor(v))
    result = {"rank": trainer.world.rank, "world": trainer.world.size, "layout": trainer.layout.name,
              "threads": torch.get_num_threads(),
              "weights": sum(tensor_bytes(p) for p in trainer.transformer.parameters()),
              "trainable": sum(tensor_bytes(p) for p in trainer.params), "grads": grads,
              "optimizer": optimizer_state, "activations": activations,
              "step_s": statistics.median(times[args.warmup:]), "times": [round(t, 4) for t in times]}
    (work / f"{result_stem(args)}-rank{trainer.world.rank}.json").write_text(json.dumps(result))
    dist.destroy()


def result_stem(args: argparse.Namespace) -> str:
    return f"{args.layout}-{args.bucket}" if args.cp else f"{args.layout}-{args.training}"


def launch(work: Path, layout: str, training: str, args: argparse.Namespace, bucket: str | None = None
           ) -> list[dict]:
    """One launch of the worker (torchrun for several processes); every rank's measurements."""
    label, nproc = (CP_LAYOUTS if bucket else LAYOUTS)[layout][:2]
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    # the 1-process rows as a plain process, as bench/train_step.py runs its own: torchrun's agent would add only
    # its start-up (a torch import) to what the worker measures itself
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)])
    command = [*launcher, __file__, "--worker", "--layout", layout, "--training", training, "--workdir", str(work),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--cp", "--bucket", bucket] if bucket else []
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    if out.returncode:
        raise SystemExit(f"{label} {training} failed (exit {out.returncode}):\n{out.stderr[-12000:]}")
    stem = f"{layout}-{bucket}" if bucket else f"{layout}-{training}"
    return [json.loads((work / f"{stem}-rank{r}.json").read_text()) for r in range(nproc)]


def mb(values: list[int]) -> str:
    low, high = min(values) / 2**20, max(values) / 2**20
    return f"{high:.2f}" if abs(high - low) < 0.005 else f"{high:.2f} ({low:.2f})"


def table(config: str, results: dict[tuple[str, str], list[dict]], args: argparse.Namespace) -> str:
    from train_step import CONFIGS

    bucket = bucket_name(*CONFIGS[config]["bucket"])
    lines = [f"`{config}` CogVideoX ({bucket}, batch 1 per rank, fp32, gloo on the CPU), median of {args.steps} "
             f"optimizer steps after {args.warmup} warm-up; MiB per rank: the largest rank (the smallest in "
             "brackets where ranks differ)", "",
             "| training | layout | processes | threads each | weights (MiB) | of them trainable | gradients | "
             "optimizer state | s/step | samples/s vs 1 process |", "|---|---|---|---|---|---|---|---|---|---|"]
    for training in TRAINING:
        base = results.get(("1", training))
        for layout, (label, nproc, _, _) in LAYOUTS.items():
            ranks = results.get((layout, training))
            if not ranks:
                continue
            step = max(r["step_s"] for r in ranks)
            speed = f"{(nproc / step) / (1 / base[0]['step_s']):.2f}x" if base else "-"
            if nproc > (os.cpu_count() or 1):
                speed += " (oversubscribed)"
            lines.append(f"| {TRAINING[training]} | {label} | {nproc} | {ranks[0]['threads']} | "
                         f"{mb([r['weights'] for r in ranks])} | {mb([r['trainable'] for r in ranks])} | "
                         f"{mb([r['grads'] for r in ranks])} | {mb([r['optimizer'] for r in ranks])} | "
                         f"{step:.3f} | {speed} |")
    cores = os.cpu_count() or 1
    lines += ["", f"This machine has {cores} cores: each process runs {cores}//processes intra-op threads (at least "
              "1), so 2 processes split the cores and 4 processes are oversubscribed (2 per core); their s/step "
              "measures contention, not how the layout scales. The bytes do not depend on the machine: under FSDP2 "
              "and HSDP each rank holds its share of the weights, gradients and optimizer state (the frozen base "
              "weights are sharded too); under DDP every rank holds all of them."]
    return "\n".join(lines)


def cp_table(config: str, results: dict[tuple[str, str], list[dict]], args: argparse.Namespace,
             tokens: dict[str, dict[str, int]]) -> str:
    lines = [f"`{config}` CogVideoX, LoRA r16, 1 sample per optimizer step, fp32, gloo on the CPU; median of "
             f"{args.steps} optimizer steps after {args.warmup} warm-up; activations: what one rank saves for its "
             "backward in one forward (MiB; the largest rank)", "",
             "| bucket | tokens (video + text) | layout | processes | threads each | activations (MiB) | "
             "vs 1 process | s/step | s/step vs 1 process |", "|---|---|---|---|---|---|---|---|---|"]
    for bucket, counts in tokens.items():
        base = results[("1", bucket)]
        for layout, (label, nproc, _, _) in CP_LAYOUTS.items():
            ranks = results[(layout, bucket)]
            step, saved = max(r["step_s"] for r in ranks), max(r["activations"] for r in ranks)
            lines.append(f"| {bucket} | {' + '.join(str(n) for n in counts.values())} | {label} | {nproc} | "
                         f"{ranks[0]['threads']} | {saved / 2**20:.1f} | {saved / base[0]['activations']:.2f}x | "
                         f"{step:.3f} | {step / base[0]['step_s']:.2f}x |")
    cores = os.cpu_count() or 1
    lines += ["", f"This machine has {cores} cores: the 2 ranks of a cp group split them, so s/step sets the "
              "split's communication and its smaller matmuls against one process with every core; on GPUs each "
              "rank has its own (and on a machine shared with other jobs, as this one may be, s/step is "
              "noisy). The activations do not depend on the machine: each rank saves about half of the video "
              "tokens' activations; the text (CogVideoX's joint sequence) is split too. Ulysses saves the "
              "whole sequence's queries, keys and values of heads / 2 heads per attention, ring its own part and "
              "the all-gathered keys and values."]
    return "\n".join(lines)


def run_cp(args: argparse.Namespace) -> str:
    """The cp rows: one model, one shard set per bucket, every CP_LAYOUTS layout on each."""
    from train_step import CONFIGS, build_medium

    from ft.cli.main import invoke
    from ft.cli.synthetic import make_shapes_dataset
    from ft.common.shards import parse_bucket
    from ft.pipelines.cogvideox import CogVideoXSpec
    from ft.pipelines.registry import save_tiny_model

    buckets = args.cp_buckets.split(",") if args.cp_buckets else [bucket_name(*CONFIGS[args.config]["bucket"])]
    results: dict[tuple[str, str], list[dict]] = {}
    tokens = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = save_tiny_model("cogvideox", work / "model") if args.config == "tiny" else build_medium(work / "model")
        for bucket in buckets:
            frames, height, width = parse_bucket(bucket)
            make_shapes_dataset(work / f"data-{bucket}", num_clips=3, frames=frames, sizes=((height, width),),
                                num_images=0, seed=0)
            invoke(["precompute", "--model", "cogvideox", "--pretrained", str(model), "--transformer-dtype", "fp32",
                    "--vae-dtype", "fp32", "--text-encoder-dtype", "fp32", "--dataset", str(work / f"data-{bucket}"),
                    "--out", str(work / f"shards-{bucket}"), "--buckets", bucket], standalone=False)
            config = json.loads((model / "transformer" / "config.json").read_text())
            vae = json.loads((model / "vae" / "config.json").read_text())
            tokens[bucket] = CogVideoXSpec().cp_sequences((frames, height, width), vae, config,
                                                           config["max_text_seq_length"])
            for layout in CP_LAYOUTS:
                t0 = time.perf_counter()
                results[(layout, bucket)] = launch(work, layout, "lora", args, bucket)
                print(f"{CP_LAYOUTS[layout][0]} {bucket}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return cp_table(args.config, results, args, tokens)


def main() -> None:
    from train_step import CONFIGS, prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="medium")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per layout")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--layouts", default="all", help=f"comma-separated, from {', '.join(LAYOUTS)} (or all)")
    parser.add_argument("--training", default="lora,full-finetune", help="comma-separated: lora, full-finetune")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one launch may take")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    parser.add_argument("--cp", action="store_true", help="the context-parallel rows (module docstring)")
    parser.add_argument("--cp-buckets", default="", help="--cp: comma-separated FxHxW buckets, one sequence "
                                                          "length each (default: the config's bucket)")
    parser.add_argument("--bucket", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=sorted({*LAYOUTS, *CP_LAYOUTS}), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.worker:
        return worker(args)
    if args.cp:
        body = run_cp(args)
        if args.no_save:
            print(body)
        else:
            from report import save_result

            save_result(f"dist_cp_{args.config}", body)
        return
    layouts = list(LAYOUTS) if args.layouts == "all" else args.layouts.split(",")
    trainings = args.training.split(",")
    for name in layouts:
        if name not in LAYOUTS:
            parser.error(f"--layouts: unknown layout {name!r}")
    for name in trainings:
        if name not in TRAINING:
            parser.error(f"--training: unknown {name!r}")
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(args.config, work)
        for training in trainings:
            for layout in layouts:
                t0 = time.perf_counter()
                results[(layout, training)] = launch(work, layout, training, args)
                print(f"{LAYOUTS[layout][0]} {training}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    body = table(args.config, results, args)
    if args.no_save:
        print(body)
    else:
        from report import save_result

        save_result(f"dist_{args.config}", body)


if __name__ == "__main__":
    main()
