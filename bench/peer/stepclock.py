"""Run `ft ...` or finetrainers' train.py in this process with light, identical instrumentation for both.

usage: python stepclock.py ft <ft args...>
       python stepclock.py peer <finetrainers source dir> <train.py args...>

Writes JSON to $H_PEER_METRICS at exit (under torchrun, rank r > 0 to $H_PEER_METRICS.rank<r>):
  t0            time.time() when this wrapper started (the interpreter is already up)
  steps         time.time() after every optimizer step (a global torch.optim post-step hook)
  cpu           time.process_time() (this process's CPU seconds, all threads) at the same moments
  rss_kb        VmRSS (kB) right after every optimizer step
  hwm_kb        VmHWM (kB, the process's peak RSS) at exit
  enc           calls into the encoders: AutoencoderKLCogVideoX._encode (and the clips it got),
                T5EncoderModel.forward (and the prompts it got). Counted through an import hook, so a
                process that never imports those modules pays nothing for the counting.
  live_mid      at optimizer step $H_PEER_MID_STEP: every live nn.Module of the three CogVideoX component
                classes (found with gc), with its parameter count and bytes: what the process holds while
                it trains.
Nothing here changes what either program computes.
"""

from __future__ import annotations

import atexit
import gc
import importlib.abc
import importlib.util
import json
import os
import runpy
import sys
import time

T0 = time.time()
OUT = os.environ.get("H_PEER_METRICS", "metrics.json")
if int(os.environ.get("RANK", "0")):  # under torchrun: rank 0 writes $H_PEER_METRICS, rank r writes it + ".rank<r>"
    OUT += f".rank{os.environ['RANK']}"
MID = int(os.environ.get("H_PEER_MID_STEP", "30"))
M: dict = {"t0": T0, "steps": [], "cpu": [], "rss_kb": [], "hwm_kb": None, "live_mid": None,
           "enc": {"vae_encode_calls": 0, "vae_clips": 0, "t5_calls": 0, "t5_prompts": 0}}
CLASSES = ("T5EncoderModel", "AutoencoderKLCogVideoX", "CogVideoXTransformer3DModel")


def _status(field: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _live_modules() -> list[dict]:
    import torch

    found = []
    for o in gc.get_objects():
        if isinstance(o, torch.nn.Module) and type(o).__name__ in CLASSES:
            n = sum(p.numel() for p in o.parameters())
            b = sum(p.numel() * p.element_size() for p in o.parameters())
            found.append({"class": type(o).__name__, "params": n, "bytes": b})
    return found


def _dump() -> None:
    M["hwm_kb"] = _status("VmHWM")
    M["t_exit"] = time.time()
    with open(OUT, "w") as f:
        json.dump(M, f)


atexit.register(_dump)


# ---- counting encoder calls, installed when (and only if) the modules get imported ----
def _patch_vae(mod) -> None:
    cls = mod.AutoencoderKLCogVideoX
    orig = cls._encode

    def _encode(self, x, *a, **k):
        M["enc"]["vae_encode_calls"] += 1
        M["enc"]["vae_clips"] += int(x.shape[0])
        return orig(self, x, *a, **k)

    cls._encode = _encode


def _patch_t5(mod) -> None:
    cls = mod.T5EncoderModel
    orig = cls.forward

    def forward(self, input_ids=None, *a, **k):
        M["enc"]["t5_calls"] += 1
        if input_ids is not None:
            M["enc"]["t5_prompts"] += int(input_ids.shape[0])
        return orig(self, input_ids, *a, **k)

    cls.forward = forward


PATCHES = {"diffusers.models.autoencoders.autoencoder_kl_cogvideox": _patch_vae,
           "transformers.models.t5.modeling_t5": _patch_t5}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader, patch = spec.loader, PATCHES[name]

        class _Loader(importlib.abc.Loader):
            def create_module(self, s):
                return loader.create_module(s)

            def exec_module(self, module):
                loader.exec_module(module)
                patch(module)

        spec.loader = _Loader()
        return spec


sys.meta_path.insert(0, _Finder())


def _install_step_hook() -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def post(opt, args, kwargs):
        M["steps"].append(time.time())
        M["cpu"].append(time.process_time())  # user+sys of all threads: less sensitive to other jobs' load
        M["rss_kb"].append(_status("VmRSS"))
        if len(M["steps"]) == MID:
            M["live_mid"] = _live_modules()

    register_optimizer_step_post_hook(post)


def main() -> None:
    mode = sys.argv[1]
    _install_step_hook()  # imports torch, as both programs do first thing anyway
    if mode == "ft":
        from ft.cli.main import main as ft_main

        sys.argv = ["ft", *sys.argv[2:]]
        ft_main()
    elif mode == "peer":
        src = sys.argv[2]
        sys.path.insert(0, src)
        sys.argv = [os.path.join(src, "train.py"), *sys.argv[3:]]
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
