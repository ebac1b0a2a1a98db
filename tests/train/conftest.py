"""The training tests' shared runs: `lora_run(family)`, the family's LoRA run of test_lora_families.py, made once a
session and reused by the family's own tests (a LoRA of that family, its summary's fixed-noise losses)."""

from __future__ import annotations

import pytest

from helpers import LORA_RUN, LORA_RUNS, train


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_model, family_shards):
    """`lora_run(family)`: (the run's output folder, its summary) of `family`'s LoRA run on its shared shards."""
    made: dict[str, tuple] = {}

    def get(family: str) -> tuple:
        if family not in made:
            out = tmp_path_factory.mktemp(f"lora-{family}") / "out"
            steps, eval_batches, extra = LORA_RUNS[family]
            summary = train(family, tiny_model(family), family_shards(family), out, *LORA_RUN, "--train-steps", steps,
                            "--eval-batches", eval_batches, *extra)
            made[family] = out, summary
        return made[family]

    return get
