"""Compiled blocks (finetrainers' `--compile_modules transformer` and `--compile_scopes regional|full`).

- regional (the default, as in finetrainers): each block of the family's block lists (ModelSpec.block_lists) is
  compiled in place with `nn.Module.compile` (what diffusers' `compile_repeated_blocks` does for the classes it
  lists; ft takes the blocks from its one source of them). The embeddings, the output projection and the loop
  stay eager. A bucket of another shape recompiles each block once, with the dimensions that changed marked
  dynamic (torch's automatic dynamic shapes); later buckets reuse that dynamic code, so a run over many buckets
  compiles each block at most twice.
- full: the whole transformer as one compiled module; every new bucket shape may recompile it.
Compiled in place, the modules keep their names, so checkpoints, the exported LoRA and FSDP2's state dicts do
not change. ft compiles after `fully_shard` and the offloading hooks; torchtitan compiles each block before
`fully_shard` (torchtitan/models/llama3/parallelize.py). With `nn.Module.compile` the order does not matter: the
compiled `_call_impl` reads the module's hooks when it runs, and FSDP2's hooks (dynamo-disabled) and offloading's
(train/offload.py, `torch.compiler.disable`) run eagerly around the compiled block either way. Gradient
checkpointing wraps each (compiled) block as before. The layers fp8 storage casts run eagerly (eager_casting).

`CompileWatch` reads dynamo's own counters and clocks, so that the first step's compile time is logged apart from
the steady s/step (trainer.py writes `compile_seconds` and `graphs_compiled` into train_log.jsonl on the steps
that compiled).
"""

from __future__ import annotations

from typing import Any

from ft.common.errors import UserError
from ft.common.logs import log

MODULES = ("transformer",)
SCOPES = ("regional", "full")
DEFAULT_SCOPES = ("regional",)  # finetrainers' default; train/config.py's
# dynamo compiles a block's code once per bucket shape before it goes dynamic; the default limit (8) is shared by
# every block of a class, so a model of many blocks would fall back to eager after a few buckets
RECOMPILE_LIMIT = 64
LAYERWISE_CASTING_HOOK = "layerwise_casting"  # diffusers.hooks.layerwise_casting._LAYERWISE_CASTING_HOOK


def check_args(modules: list[str], scopes: list[str], backend: str = "inductor") -> str | None:
    """`--compile-modules`, `--compile-scopes` (one scope, or one per module, as finetrainers takes them) and
    `--compile-backend`, before any model loads; returns the scope, None when nothing is compiled."""
    for m in modules:
        if m not in MODULES:
            raise UserError(f"--compile-modules {m}: ft train loads only the transformer; pass --compile-modules "
                            "transformer.")
    for s in scopes:
        if s not in SCOPES:
            raise UserError(f"--compile-scopes {s}: use regional (each transformer block) or full (the whole "
                            "transformer).")
    if not modules:
        if list(scopes) != list(DEFAULT_SCOPES):  # the default is saved in every train_config.json: taken
            raise UserError(f"--compile-scopes {' '.join(scopes)}: nothing is compiled without --compile-modules "
                            "transformer; add it, or leave --compile-scopes out.")
        return None
    if len(scopes) not in (1, len(modules)):
        raise UserError(f"--compile-scopes takes one scope or one per --compile-modules entry, got {len(scopes)} for "
                        f"{len(modules)}.")
    if backend != "inductor":
        import torch

        backends = torch._dynamo.list_backends(exclude_tags=())
        if backend not in backends:
            raise UserError(f"--compile-backend {backend!r} is not a torch.compile backend here; use one of: "
                            f"{', '.join(sorted(backends))}.")
    return scopes[0]


def eager_casting(modules: list[Any]) -> int:
    """Run the layers that fp8 storage casts (diffusers' layerwise casting hooks) outside the compiled graph;
    returns how many. Traced by dynamo, the hook's in-place cast of the weight to --transformer-dtype and back is
    seen by gradient checkpointing's recompute in the storage dtype (torch.utils.checkpoint's CheckpointError:
    "Recomputed values ... have different metadata", bf16 saved, fp8 recomputed); eager, the cast layer is what it
    is without compile, and the compiled graphs hold what lies between the cast layers (norms, attention, rotary
    embeddings, activations)."""
    import torch

    count = 0
    for root in modules:
        for module in root.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(LAYERWISE_CASTING_HOOK) is not None:
                module.forward = torch.compiler.disable(module.forward)
                count += 1
    return count


def apply_compile(transformer: Any, blocks: list[Any], scope: str, backend: str = "inductor") -> None:
    """Compile `transformer` in place: each of `blocks` (regional) or the whole module (full) with torch.compile's
    `backend` (`--compile-backend`; aot_eager captures the graphs with autograd without inductor's code
    generation)."""
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    cast = eager_casting([transformer])
    if cast:
        log.info(f"torch.compile: the {cast} layers stored in fp8 run eagerly between the compiled graphs")
    if scope == "full":
        transformer.compile(backend=backend)
    else:
        for block in blocks:
            block.compile(backend=backend)
    log.info(f"torch.compile: {'the whole transformer' if scope == 'full' else f'{len(blocks)} blocks'} (compiled "
             "on the first step of each bucket shape; that step's compile time is logged as compile_seconds)")


class CompileWatch:
    """What dynamo compiled since the last `take()`: graphs (its counters) and wall seconds between its
    compile-start and compile-end callbacks (`torch._dynamo.callback`, which also fire for the backward graph that
    AOTAutograd compiles at the first backward); nested compiles are counted once."""

    def __init__(self) -> None:
        from torch._dynamo.callback import callback_handler

        self.seconds, self.started, self.depth = 0.0, 0.0, 0
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)
        self.graphs = self._graphs()

    def _start(self, args: Any = None) -> None:
        import time

        if self.depth == 0:
            self.started = time.perf_counter()
        self.depth += 1

    def _end(self, args: Any = None) -> None:
        import time

        self.depth -= 1
        if self.depth == 0:
            self.seconds += time.perf_counter() - self.started

    @staticmethod
    def _graphs() -> int:
        from torch._dynamo import utils

        return int(utils.counters["stats"]["unique_graphs"])

    def take(self) -> dict[str, float]:
        """{"graphs_compiled": n, "compile_seconds": s} for what compiled since the last call; {} when nothing."""
        graphs = self._graphs()
        new = {"graphs_compiled": graphs - self.graphs, "compile_seconds": round(self.seconds, 3)}
        self.graphs, self.seconds = graphs, 0.0
        return new if new["graphs_compiled"] or new["compile_seconds"] > 0 else {}

    def close(self) -> None:
        from torch._dynamo.callback import callback_handler

        callback_handler.remove_start_callback(self._start)
        callback_handler.remove_end_callback(self._end)


def compile_summary(times: list[tuple[float, dict[str, float]]]) -> dict[str, Any]:
    """A compiled run's first step, its compile time, and the steady s/step of the steps that compiled nothing;
    logged in one line."""
    compiling = [(s, c) for s, c in times if c]
    steady = [s for s, c in times if not c]
    out: dict[str, Any] = {
        "first_step_seconds": round(times[0][0], 3) if times else None,
        "compile_seconds": round(sum(c["compile_seconds"] for _, c in compiling), 3),
        "graphs_compiled": sum(int(c["graphs_compiled"]) for _, c in compiling),
        "steady_seconds_per_step": round(sum(steady) / len(steady), 4) if steady else None}
    if times:
        rate = f"{out['steady_seconds_per_step']:.3f} s/step" if steady else "no step without compiling"
        log.info(f"torch.compile: {out['graphs_compiled']} graph(s) in {out['compile_seconds']:.1f} s over "
                 f"{len(compiling)} step(s) (the first step took {out['first_step_seconds']:.1f} s); steady {rate} "
                 f"over the {len(steady)} other step(s)")
    return out
