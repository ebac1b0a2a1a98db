"""`ft train` under torchrun with gloo on the CPU: DDP and FSDP2 on 2 processes, HSDP on 4 (2 x 2), LoRA and full
finetune, each against the 1-process run at the same samples per optimizer step; resume across degrees; a corrupt
shard on one rank, a non-finite loss and a degree mismatch end every rank with the message.

Tolerance: the runs are fp32, and a layout changes only the order of floating-point sums (a gradient is the mean
of two halves all-reduced, not of one batch), about 1e-7 relative per step; over 6 Adam steps the losses stay
within 1e-5 relative and LoRA weights within 1e-5 absolute. A full finetune's weights are compared by how far
they moved: Adam turns a gradient that is pure rounding noise (the key-norm bias, to which softmax is blind)
into a full-size step of random sign, so those few weights differ by up to lr x steps between any two summation
orders; the whole update differs by less than 1% of its size. Every test starts real torchrun processes (marked
slow: `pytest -m "not slow"` skips them while iterating).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import BUCKETS, FP32, run_cli, torchrun, train, train_args, train_log

pytestmark = pytest.mark.slow
STEPS = ["--train-steps", "6", "--lr", "3e-3", "--lr-warmup-steps", "1", "--seed", "9", "--checkpointing-steps", "3",
         "--report-to", "none"]
LORA = ["--rank", "4", "--lora-alpha", "8"]
FULL = ["--training-type", "full-finetune"]
# flags that do nothing here, each worth a note: every `launched` run passes them (its curve, compared with the
# 1-process run's, shows they change nothing), and test_under_torchrun_a_flag_note_is_said_once counts the notes
NOTED = ["--validation-steps", "3", "--pin_memory"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_cog, shapes_data):
    """The shapes dataset in 4 shards (3 samples each at most), so each of 2 ranks verifies 2 of them."""
    out = tmp_path_factory.mktemp("dist") / "shards"
    run_cli(["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", shapes_data,
             "--out", out, *BUCKETS, "--shard-samples", "3"])
    return out


def losses(out):
    return [r["loss"] for r in train_log(out)]


def weights(out, training_type):
    if training_type == "lora":
        return load_file(out / "pytorch_lora_weights.safetensors")
    from diffusers import CogVideoXTransformer3DModel

    folder = out / "transformer"  # a run's output, or a base model folder
    return CogVideoXTransformer3DModel.from_pretrained(folder).state_dict()


def assert_same_run(a, b, training_type, base=None):
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)
    wa, wb = weights(a, training_type), weights(b, training_type)
    assert wa.keys() == wb.keys()
    if training_type == "lora":
        assert all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0) for k in wa)
        return
    w0 = weights(base, "full")
    differ = torch.cat([(wa[k] - wb[k]).flatten() for k in wa]).norm()
    moved = torch.cat([(wb[k] - w0[k]).flatten() for k in wb]).norm()
    assert differ < 0.01 * moved, (differ, moved)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_cog, shards):
    """1-process runs at 2 and 4 samples per optimizer step, LoRA and full finetune."""
    root = tmp_path_factory.mktemp("one-process")
    runs = {}
    for training_type, extra in (("lora", LORA), ("full-finetune", FULL)):
        for samples in (2, 4):
            out = root / f"{training_type}-{samples}"
            train("cogvideox", tiny_cog, shards, out, *STEPS, *extra, "--batch-size", samples)
            runs[training_type, samples] = out
    return runs


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_cog, shards):
    """Runs under torchrun, each started once per module: (processes, layout flags, training type) -> result.
    Each also passes NOTED."""
    cache = {}

    def launch(nproc, layout, training_type):
        key = (nproc, tuple(layout), training_type)
        if key not in cache:
            out = tmp_path_factory.mktemp("launched") / "out"
            extra = LORA if training_type == "lora" else FULL
            done = torchrun(nproc, train_args("cogvideox", tiny_cog, shards, out, *STEPS, *extra, "--batch-size", 1,
                                              *layout, *NOTED))
            assert done.returncode == 0, done.stderr[-3000:]
            cache[key] = out, done
        return cache[key]

    return launch


@pytest.mark.parametrize("training_type", ["lora", "full-finetune"])
@pytest.mark.parametrize("layout", [[], ["--dp-shards", "2"]], ids=["ddp", "fsdp2"])
def test_two_processes_follow_the_one_process_curve(tiny_cog, reference, launched, training_type, layout):
    out, done = launched(2, layout, training_type)
    assert_same_run(out, reference[training_type, 2], training_type, tiny_cog)
    # rank 0 alone logs and exports: one line per step, the result saved once
    assert len(losses(out)) == 6
    result = out / ("pytorch_lora_weights.safetensors" if training_type == "lora" else "transformer")
    assert done.stderr.count(f"saved {result};") == 1
    state = json.loads((out / "checkpoints" / "checkpoint-000006" / "state.json").read_text())
    shards_degree = 2 if layout else 1
    assert state["parallel"] == {"world_size": 2, "dp_degree": 2 // shards_degree, "dp_shards": shards_degree,
                                 "cp_degree": 1}
    assert state["samples_per_step"] == 2


@pytest.mark.parametrize("training_type", ["lora", "full-finetune"])
def test_hsdp_on_a_2x2_mesh_follows_the_one_process_curve(tiny_cog, reference, launched, training_type):
    out, done = launched(4, ["--dp-degree", "2", "--dp-shards", "2"], training_type)
    assert "HSDP: 2 replicas x 2 shards" in done.stderr
    assert_same_run(out, reference[training_type, 4], training_type, tiny_cog)


def test_under_torchrun_a_flag_note_is_said_once(launched):
    """A flag that does nothing (finetrainers' --pin_memory) and one that does nothing without another
    (--validation-steps without --validation-dataset-file) are each noted once, by rank 0, not once per rank."""
    _, done = launched(2, [], "lora")
    assert done.stderr.count("accepted, nothing to do in ft") == 1, done.stderr[-3000:]
    assert done.stderr.count("--validation-steps 3 does nothing without --validation-dataset-file") == 1


def test_the_exported_lora_of_two_processes_loads_in_diffusers(tiny_cog, launched):
    import numpy as np
    from diffusers import CogVideoXPipeline

    out, _ = launched(2, ["--dp-shards", "2"], "lora")

    def render(pipe):
        return pipe(prompt="a red circle", num_frames=9, height=32, width=32, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np", max_sequence_length=16).frames[0]

    pipe = CogVideoXPipeline.from_pretrained(tiny_cog)
    base = render(pipe)
    pipe.load_lora_weights(out)
    assert np.abs(render(pipe) - base).max() > 1e-5


@pytest.mark.parametrize("saved_with,resumed_with", [
    ((2, []), (1, [])),  # DDP -> one process
    ((1, []), (2, [])),  # one process -> DDP
    ((2, []), (2, ["--dp-shards", "2"])),  # DDP -> FSDP2
], ids=["ddp-to-1", "1-to-ddp", "ddp-to-fsdp2"])
def test_a_resume_under_other_degrees_continues_the_curve(tiny_cog, shards, reference, launched, tmp_path,
                                                          saved_with, resumed_with):
    # the step-3 checkpoint of a straight 6-step run, resumed in another layout, ends as the 1-process run
    nproc, layout = saved_with
    first = reference["lora", 2] if nproc == 1 else launched(nproc, layout, "lora")[0]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(first / "checkpoints" / "checkpoint-000003", resumed / "checkpoints" / "checkpoint-000003")
    nproc, layout = resumed_with
    argv = train_args("cogvideox", tiny_cog, shards, resumed, *STEPS, *LORA, "--batch-size", 2 // nproc, *layout,
                      "--resume-from-checkpoint", "latest")
    if nproc == 1:
        run_cli(argv)
    else:
        done = torchrun(nproc, argv)
        assert done.returncode == 0, done.stderr[-3000:]
    assert losses(resumed) == pytest.approx(losses(reference["lora", 2])[3:], rel=1e-5)
    a, b = weights(resumed, "lora"), weights(reference["lora", 2], "lora")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)


def test_a_resume_with_other_samples_per_step_is_refused_with_the_numbers(tiny_cog, shards, reference, tmp_path):
    from ft.common.errors import UserError

    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference["lora", 2] / "checkpoints" / "checkpoint-000003", out / "checkpoints" /
                    "checkpoint-000003")
    with pytest.raises(UserError, match="trained 2 samples per optimizer step, this run 4.*--batch-size 2"):
        train("cogvideox", tiny_cog, shards, out, *STEPS, *LORA, "--batch-size", 4, "--resume-from-checkpoint",
              "latest")


def corrupt_a_shard_of_rank_1(shards, tmp_path):
    """A copy of the set whose second shard (verified by rank 1) has a flipped byte in a tensor."""
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    shard = sorted(bad.glob("shard-*.tar"))[1]
    import tarfile

    with tarfile.open(shard) as tar:
        member = next(m.offset_data for m in tar.getmembers() if m.name.endswith(".latents.safetensors"))
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[member:member + 8], "little")
    data[member + 8 + header + 16] ^= 0xFF  # inside the tensor bytes: it still parses, only the digest tells
    shard.write_bytes(bytes(data))
    return bad, shard.name


def test_a_corrupt_shard_on_one_rank_stops_every_rank_with_its_message(tiny_cog, shards, tmp_path):
    bad, name = corrupt_a_shard_of_rank_1(shards, tmp_path)
    start = time.monotonic()
    done = torchrun(2, train_args("cogvideox", tiny_cog, bad, tmp_path / "out", *STEPS, *LORA, "--batch-size", 1,
                                  "--train-steps", 50, "--nccl-timeout", 60), timeout=240)
    # well within the test's time even on a loaded machine: the ranks stop at the step the shard is first read
    assert done.returncode != 0 and time.monotonic() - start < 150, done.stderr[-3000:]
    assert "[ft rank 1] error:" in done.stderr and name in done.stderr, done.stderr[-3000:]
    assert "[ft] error:" not in done.stderr, done.stderr[-3000:]  # rank 0 stopped too, leaving the message to rank 1
    assert "exitcode: 2" in done.stderr, done.stderr[-3000:]  # ft's UserError exit, not a kill


def test_a_non_finite_loss_stops_every_rank(tiny_cog, shards, tmp_path):
    done = torchrun(2, train_args("cogvideox", tiny_cog, shards, tmp_path / "out", *STEPS, *LORA, "--batch-size", 1,
                                  "--lr", "1e30", "--max-grad-norm", "0", "--train-steps", "40"), timeout=120)
    assert done.returncode != 0
    assert done.stderr.count("training diverged") == 1, done.stderr[-3000:]  # said once, by rank 0


def test_degrees_that_do_not_multiply_to_the_world_are_one_message_before_any_weight_loads(tiny_cog, shards,
                                                                                          tmp_path):
    done = torchrun(2, train_args("cogvideox", tiny_cog, shards, tmp_path / "out", *STEPS, *LORA, "--dp-degree", 2,
                                  "--dp-shards", 2), timeout=120)
    assert done.returncode != 0
    message = "--dp-degree 2 x --dp-shards 2 asks for a world of 4 processes, but torchrun started 2 processes"
    assert done.stderr.count(message) == 1, done.stderr[-3000:]
    assert "training CogVideoX" not in done.stderr and not (tmp_path / "out").exists()


def test_two_tasks_of_a_plain_srun_train_as_ddp(tiny_cog, shards, reference, tmp_path):
    # what srun gives each task (no torchrun): SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, and the
    # rendezvous address the batch script exports
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    argv = train_args("cogvideox", tiny_cog, shards, out, *STEPS, *LORA, "--batch-size", 1)
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    tasks = [subprocess.Popen([sys.executable, "-m", "ft.cli.main", *argv], stderr=subprocess.PIPE, text=True,
                              env={**base, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(r),
                                   "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in (0, 1)]
    errors = [t.communicate(timeout=240)[1] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert "DDP over 2 replicas" in errors[0] and "training CogVideoX" not in errors[1]  # rank 1 says nothing
    assert_same_run(out, reference["lora", 2], "lora")


def test_a_log_write_failing_on_rank_zero_stops_every_rank_with_its_message(tiny_cog, shards, tmpfs):
    """Rank 0 alone writes train_log.jsonl: when the disk fills under it, the other rank stops with it at the
    same point (not a gloo traceback in its next collective, or a wait of --nccl-timeout under nccl)."""
    from helpers import fill

    disk = tmpfs("out", "4m")
    out = disk / "run"
    out.mkdir()
    fill(disk, 3 * 4096)  # train_config.json takes a page, the log fills the rest after a few dozen steps
    done = torchrun(2, train_args("cogvideox", tiny_cog, shards, out, *STEPS, *LORA, "--batch-size", 1, "--train-steps",
                                  400, "--checkpointing-steps", 1000), timeout=180)
    assert done.returncode != 0
    assert "no space left on the device" in done.stderr
    assert "training stopped after step" in done.stderr
    assert "Connection closed" not in done.stderr and "[rank1]: Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.count("error: --output-dir") == 1  # printed once, by rank 0


def live_children(pid):
    """The processes `pid` started that have not exited (a zombie not yet reaped counts as exited)."""
    from pathlib import Path

    found = []
    try:
        children = [c for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    except FileNotFoundError:  # it has just exited
        return found
    for child in children:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state not in "ZX":
            found.append(int(child))
    return found


def test_a_rank_that_hangs_ends_the_others_at_the_timeout_with_a_message(tiny_cog, shards, tmp_path):
    """Rank 0 is stopped (SIGSTOP) after its second log line; rank 1 waits at most --nccl-timeout in the next
    collective, then says so in one line naming the last checkpoint (not a gloo traceback).

    What torchrun does next is not ft's: it sends the stopped rank SIGTERM, which it cannot act on, and SIGKILLs it
    30 s later (torch 2.13 uses that fixed grace when a worker fails; --shutdown-timeout and
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT apply only to a signal to the agent). The test does that SIGKILL itself once rank
    1 has exited, instead of waiting the 30 s."""
    import signal

    from helpers import stopped

    env = {"FT_TEST_KILL_AT": "logged:2", "FT_TEST_KILL_SIGNAL": "STOP"}
    argv = train_args("cogvideox", tiny_cog, shards, tmp_path / "out", *STEPS, *LORA, "--batch-size", 1,
                      "--train-steps", 20, "--checkpointing-steps", 1, "--nccl-timeout", 5)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ft.cli.main", *argv]
    with open(tmp_path / "stderr.txt", "w") as err:
        agent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env})
        deadline = time.monotonic() + 240
        try:
            while agent.poll() is None:
                assert time.monotonic() < deadline, "torchrun did not end"
                time.sleep(0.2)
                workers = live_children(agent.pid)
                if len(workers) == 1 and stopped(workers[0]):  # rank 1 has exited; rank 0 is the stopped one
                    os.kill(workers[0], signal.SIGKILL)
                    agent.wait(timeout=60)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert agent.returncode != 0
    assert ("[ft rank 1] error: rank 1 stopped at step 2: another rank stopped answering (a collective timed out "
            "after --nccl-timeout)") in stderr, stderr[-3000:]
    assert "The last checkpoint is step 1" in stderr
