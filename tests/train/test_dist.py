"""Who a process is (torchrun, srun, one process) and the layout its flags ask for: pure functions of the
environment and the flags, checked before anything loads."""

from __future__ import annotations

import pytest

from ft.common.errors import UserError
from ft.train.dist import World, export_srun_env, world_from_env
from ft.train.parallel import Layout, resolve_layout


def test_the_launchers_environment_names_the_process():
    assert world_from_env({}) == World()
    assert world_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == World(3, 8, 1, "torchrun")
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5", "SLURM_NTASKS": "16"}
    assert world_from_env(srun) == World(5, 16, 5, "srun")
    # the batch script itself (no srun step) is one process, whatever the allocation holds
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}) == World()
    # srun + torchrun: torchrun's names win
    assert world_from_env({**srun, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).launcher == "torchrun"
    with pytest.raises(UserError, match="not a place in a world"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(UserError, match="WORLD_SIZE='two' is not a number"):
        world_from_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_a_plain_srun_needs_the_rendezvous_address():
    world = World(1, 2, 1, "srun")
    with pytest.raises(UserError, match="MASTER_ADDR and MASTER_PORT are not set"):
        export_srun_env(world, {})
    env = {"MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    export_srun_env(world, env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "1")


@pytest.mark.parametrize("degree,shards,world,layout", [
    (-1, -1, 1, Layout(1, 1)), (-1, -1, 8, Layout(8, 1)), (-1, 8, 8, Layout(1, 8)), (2, -1, 8, Layout(2, 4)),
    (2, 4, 8, Layout(2, 4)), (1, -1, 4, Layout(1, 4)),  # finetrainers' --dp_degree 1 alone: shards fill the world
])
def test_replicas_times_shards_is_the_world(degree, shards, world, layout):
    assert resolve_layout(degree, shards, World(0, world, 0, "torchrun")) == layout


@pytest.mark.parametrize("degree,shards,world,message", [
    (2, 2, 2, "--dp-degree 2 x --dp-shards 2 asks for a world of 4 processes, but torchrun started 2"),
    (3, -1, 4, "--dp-degree 3 asks for a world of 3 processes"),
    (-1, 2, 1, "started as one process: launch with `torchrun"),
    (0, -1, 2, "--dp-degree must be a positive number"),
])
def test_degrees_that_do_not_fit_are_one_clear_message(degree, shards, world, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_layout(degree, shards, World(0, world, 0, "torchrun" if world > 1 else "one process"))


def test_layout_names():
    assert Layout(1, 1).name == "one process" and Layout(4, 1).name == "DDP over 4 replicas"
    assert Layout(1, 4).name == "FSDP2 over 4 shards" and Layout(2, 2).name == "HSDP: 2 replicas x 2 shards"


def test_fsdp2_keeps_fp32_inputs_for_autocast(tmp_path):
    # --master-dtype fp32 under FSDP2 computes in bf16 through autocast, as one process does: the forward's fp32
    # inputs (timesteps, rotary tables passed to the blocks) reach the modules in fp32, not rounded to bf16 by
    # the policy (999.0 in bf16 is 1000.0)
    import torch
    import torch.distributed as torch_dist
    from torch.distributed.device_mesh import init_device_mesh

    from ft.train.parallel import Layout, parallelize

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x, t):
            seen.append(t.dtype)
            return self.proj(x)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x, timestep):
            seen.append(timestep.dtype)
            for block in self.blocks:
                x = block(x, timestep)
            return x

    seen: list = []
    torch_dist.init_process_group("gloo", store=torch_dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                                  world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("shard",))
        model = parallelize(Model(), Layout(1, 2), mesh, "cpu", ("blocks",), compute_dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(2, 4), torch.tensor([999.0, 3.0]))
    finally:
        torch_dist.destroy_process_group()
    assert seen == [torch.float32] * 3


def test_a_rank_without_a_gpu_says_so_itself(monkeypatch):
    # only the ranks past the node's GPU count meet it, so such a rank prints its own message: marked quiet (left
    # to rank 0, which has a GPU and goes on to wait for the others) nobody would print it
    import torch

    from ft.train import preflight, trainer
    from ft.train.config import TrainConfig

    monkeypatch.setattr(trainer.dist, "world_from_env", lambda: World(1, 2, 1, "torchrun"))
    monkeypatch.setattr(trainer, "quiet_other_ranks", lambda rank: None)
    monkeypatch.setattr(preflight, "pick_device", lambda requested: "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = TrainConfig(model="cogvideox", pretrained="m", shards=["s"], output_dir="o", device="cuda")
    with pytest.raises(UserError, match="local rank 1 has no GPU") as raised:
        trainer.Trainer(cfg)
    assert not getattr(raised.value, "quiet", False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="each process trains on cuda:LOCAL_RANK") as raised:  # alike on every rank
        trainer.Trainer(TrainConfig(model="cogvideox", pretrained="m", shards=["s"], output_dir="o", device="cuda:1"))
    assert raised.value.quiet


def test_a_world_without_a_rank_or_a_rendezvous_is_one_clear_message(monkeypatch):
    from ft.train.dist import init_process_group

    with pytest.raises(UserError, match="WORLD_SIZE=2 but sets no RANK"):
        world_from_env({"WORLD_SIZE": "2"})
    assert world_from_env({"WORLD_SIZE": "1"}) == World()  # torchrun --nproc 1, or a stray WORLD_SIZE=1
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(UserError, match="MASTER_ADDR and MASTER_PORT are not set"):
        init_process_group(World(0, 2, 0, "torchrun"), "cpu", 5)


def test_processes_that_never_meet_end_at_the_init_timeout_with_a_message(monkeypatch):
    import socket

    from ft.train.dist import init_process_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"did not meet at 127\.0\.0\.1:\d+ within --init-timeout 2 s.*1/2"):
        init_process_group(World(0, 2, 0, "torchrun"), "cpu", 2)
