"""finetrainers' flags and dataset config, translated to ft (no model runs here: see tests/test_finetrainers_run.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ft.cli.finetrainers import FLAGS, translate
from ft.cli.main import command_configs
from ft.common.errors import UserError
from ft.precompute.dataset_config import read_dataset_config, strip_llm_prefix

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["--model_name", "cogvideox", "--pretrained_model_name_or_path", "THUDM/CogVideoX-5b"]


def tr(command: str, *argv: str, config: dict | None = None):
    return translate(command, list(argv), config, command_configs(), "run.toml")


def test_every_flag_of_finetrainers_args_py_is_in_the_table():
    # finetrainers/args.py (a-r-r-o-w/finetrainers f476c37) and its SFT LoRA config, by argparse name
    args_py = """parallel_backend pp_degree dp_degree dp_shards cp_degree tp_degree model_name
    pretrained_model_name_or_path revision variant cache_dir tokenizer_id tokenizer_2_id tokenizer_3_id text_encoder_id
    text_encoder_2_id text_encoder_3_id transformer_id vae_id text_encoder_dtype text_encoder_2_dtype
    text_encoder_3_dtype transformer_dtype vae_dtype layerwise_upcasting_modules layerwise_upcasting_storage_dtype
    layerwise_upcasting_skip_modules_pattern dataset_config dataset_shuffle_buffer_size enable_precomputation
    precomputation_items precomputation_dir precomputation_once precomputation_reuse dataloader_num_workers pin_memory
    flow_resolution_shifting flow_base_seq_len flow_max_seq_len flow_base_shift flow_max_shift flow_shift
    flow_weighting_scheme flow_logit_mean flow_logit_std flow_mode_scale training_type seed batch_size train_steps
    max_data_samples gradient_accumulation_steps gradient_checkpointing checkpointing_steps checkpointing_limit
    resume_from_checkpoint enable_slicing enable_tiling lr lr_scheduler lr_warmup_steps lr_num_cycles lr_power
    optimizer beta1 beta2 beta3 weight_decay epsilon max_grad_norm validation_dataset_file validation_steps
    enable_model_cpu_offload tracker_name push_to_hub hub_token hub_model_id output_dir logging_dir logging_steps
    init_timeout nccl_timeout report_to verbose compile_modules compile_scopes allow_tf32 float32_matmul_precision
    list_models attn_provider_training attn_provider_inference rank lora_alpha target_modules""".split()
    assert not set(args_py) - set(FLAGS)


def test_each_stage_takes_its_flags_and_names_the_others_once():
    argv = [*MODEL, "--dataset", "data", "--out", "shards", "--rank", "32", "--lr", "5e-5", "--batch_size", "4",
            "--batch-size", "2", "--enable_tiling", "--train_steps", "10", "--gradient_checkpointing"]
    pre = tr("precompute", *argv)
    (run,) = pre.runs
    assert run[:4] == ["--model", "cogvideox", "--pretrained", "THUDM/CogVideoX-5b"]
    assert "--vae-tiling" in run and run[run.index("--batch-size") + 1] == "2"
    assert pre.info_lines()[0] == ("left to ft train: --rank, --lr, --batch_size, --train_steps, "
                                   "--gradient_checkpointing")
    train = tr("train", *MODEL, "--out", "shards", "--rank", "32", "--batch_size", "4", "--enable_tiling",
               "--dataset", "data", "--shards", "s", "--output_dir", "o")
    (run,) = train.runs
    assert run[run.index("--batch-size") + 1] == "4"  # the underscore spelling is finetrainers' training batch
    assert "--vae-tiling" not in run
    assert train.info_lines()[0] == "left to ft precompute: --out, --enable_tiling, --dataset"


def test_config_file_keys_follow_the_same_rules_and_flags_override_them():
    config = {"model": "cogvideox", "pretrained": "p", "rank": 8, "buckets": ["9x32x32"], "train-steps": 5,
              "gradient_checkpointing": True}
    pre = tr("precompute", "--dataset", "d", "--out", "o", "--buckets", "9x32x64", config=config)
    (run,) = pre.runs
    assert run[run.index("--buckets") + 1] == "9x32x64" and run.count("--buckets") == 1
    assert "--rank" in pre.info_lines()[0] and "--gradient_checkpointing" in pre.info_lines()[0]
    with pytest.raises(UserError, match="'rnak' is not a setting of this command; did you mean 'rank'"):
        tr("train", "--shards", "s", config={**config, "rnak": 3})


def test_flags_with_nothing_to_do_are_accepted_when_they_ask_for_nothing():
    ok = tr("train", *MODEL, "--shards", "s", "--output_dir", "o", "--parallel_backend", "ptd", "--pp_degree", "1",
            "--dp_degree", "1", "--dp_shards", "1", "--cp_degree", "1", "--tp_degree", "1", "--enable_precomputation",
            "--precomputation_items", "25", "--precomputation_once", "--dataloader_num_workers", "0",
            "--tracker_name", "x", "--init_timeout", "600", "--nccl_timeout", "600", "--validation_steps", "500")
    lines = "\n".join(ok.info_lines())
    assert "nothing to do in ft" in lines and "--enable_precomputation" in lines and "--pp_degree" in lines
    assert "ft does not have these yet" not in lines  # data parallelism and validation are both there now
    (run,) = ok.runs  # the parallel degrees and timeouts are ft train's own
    assert run[run.index("--dp-degree") + 1] == "1" and run[run.index("--dp-shards") + 1] == "1"
    assert run[run.index("--init-timeout") + 1] == "600" and run[run.index("--nccl-timeout") + 1] == "600"


@pytest.mark.parametrize(("flag", "message"), [
    (["--pp_degree", "2"], "does not split the model"),
    (["--tp_degree", "4"], "does not split the model"),
    (["--validation_prompts", "a cat"], "write the prompts as a --validation_dataset_file"),
    (["--push_to_hub"], "huggingface-cli upload"),
    (["--optimizer", "adam-bnb-8bit"], "no 8-bit Adam"),
    (["--training_type", "control-lora"], "control conditioning is not supported"),
    (["--logging_dir", "elsewhere"], "OUTPUT_DIR/logs"),
])
def test_flags_asking_for_what_ft_lacks_are_refused_with_the_reason(flag, message):
    for command in ("precompute", "train"):  # refused in both stages: no hour of encoding before the refusal
        with pytest.raises(UserError, match=message):
            tr(command, *MODEL, "--dataset", "d", "--out", "o", "--shards", "s", *flag)


def test_cp_degree_becomes_ft_trains_context_parallel_degree():
    (run,) = tr("train", *MODEL, "--shards", "s", "--parallel_backend", "ptd", "--dp_shards", "2", "--cp_degree",
                "2").runs
    assert run[run.index("--cp-degree") + 1] == "2" and run[run.index("--dp-shards") + 1] == "2"
    pre = tr("precompute", *MODEL, "--dataset", "d", "--out", "o", "--cp_degree", "2")  # a training setting
    assert "--cp-degree" not in pre.runs[0] and "--cp_degree" in "\n".join(pre.info_lines())


def test_validation_flags_reach_both_stages():
    pre = tr("precompute", *MODEL, "--dataset", "d", "--out", "o", "--validation_dataset_file", "v.json",
             "--validation_steps", "500", "--enable_model_cpu_offload")
    (run,) = pre.runs
    assert run[run.index("--validation-dataset-file") + 1] == "v.json" and "--validation-steps" not in run
    assert "--validation_steps" in pre.info_lines()[0]  # left to ft train, named once
    train = tr("train", *MODEL, "--shards", "s", "--validation_dataset_file", "v.json", "--validation_steps", "500",
               "--gradient_accumulation_steps", "4", "--enable_model_cpu_offload")
    (run,) = train.runs
    assert run[run.index("--validation-dataset-file") + 1] == "v.json"
    assert run[run.index("--validation-steps") + 1] == "125"  # finetrainers counts micro-batches
    assert "--enable_model_cpu_offload" in "\n".join(train.info_lines())


def test_model_names():
    assert tr("train", "--model_name", "ltx_video", "--pretrained_model_name_or_path", "p", "--shards", "s"
              ).runs[0][:2] == ["--model", "ltx_video"]
    assert tr("train", "--model_name", "wan", "--pretrained_model_name_or_path", "p", "--shards", "s"
              ).runs[0][:2] == ["--model", "wan"]
    with pytest.raises(UserError, match="flux: a finetrainers family not supported by ft; it supports cogvideox, "
                                        "ltx_video, hunyuan_video, wan"):
        tr("train", "--model_name", "flux")


def test_optimizer_names_map_where_the_meaning_is_the_same():
    def optimizer(name):
        run = tr("train", "--optimizer", name).runs[0]
        return run[run.index("--optimizer") + 1]

    assert [optimizer(n) for n in ("adam", "adamw", "adamw-bnb-8bit", "adamw-bnb", "adam-bnb")] == [
        "adam", "adamw", "adamw-8bit", "adamw", "adam"]


def test_did_you_mean_only_for_near_spellings():
    with pytest.raises(UserError) as e:
        tr("train", "--resolution_bucketing", "1")
    assert "did you mean" not in str(e.value)
    with pytest.raises(UserError, match=r"did you mean --pretrained_model_name_or_path \(ft: --pretrained\)"):
        tr("train", "--pretrained_model_name_or_pth", "x")
    with pytest.raises(UserError, match="did you mean --train-steps"):
        tr("train", "--train-stepz", "3")
    with pytest.raises(UserError, match="it is a flag of ft generate"):
        tr("train", "--prompt", "x")


def test_legacy_bucket_flags_and_the_regex_target_modules():
    run = tr("precompute", "--video_resolution_buckets", "49x480x720", "9x32x32", "--image_resolution_buckets",
             "480x720", "--dataset", "d", "--out", "o").runs[0]
    assert [run[i + 1] for i, a in enumerate(run) if a == "--buckets"] == ["49x480x720", "9x32x32", "1x480x720"]
    regex = "(transformer_blocks|single_transformer_blocks).*(to_q|to_k|to_v|to_out.0)"
    run = tr("train", "--target_modules", regex).runs[0]
    assert run[run.index("--target-modules") + 1] == regex


def test_max_data_samples_stops_training_early():
    t = tr("train", "--max_data_samples", "12", "--batch_size", "2", "--gradient_accumulation_steps", "2",
           "--train_steps", "100")
    assert t.runs[0][t.runs[0].index("--train-steps") + 1] == "3"
    assert any("training stops after 3 steps" in note for note in t.notes)


def write_config(path: Path, *datasets: dict) -> Path:
    path.write_text(json.dumps({"datasets": list(datasets)}))
    return path


def test_dataset_config_makes_one_precompute_run_per_dataset_and_train_mixes_them(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config = write_config(
        tmp_path / "training.json",
        {"data_root": str(tmp_path / "a"), "dataset_type": "video", "id_token": "PIKA", "video_resolution_buckets":
         [[9, 32, 32], [9, 32, 64]], "reshape_mode": "bicubic", "remove_common_llm_caption_prefixes": True},
        {"data_root": str(tmp_path / "b"), "dataset_type": "image", "image_resolution_buckets": [[32, 32]],
         "reshape_mode": "center_crop", "weight": 0.25})
    runs = tr("precompute", "--dataset_config", str(config), "--out", "shards").runs
    assert len(runs) == 2
    first = " ".join(runs[0])
    assert "--buckets 9x32x32 --buckets 9x32x64" in first and "--resize-mode stretch" in first
    assert "--id-token PIKA" in first and "--strip-llm-prefixes" in first and "--out shards/0-a" in first
    assert "--frame-sampling uniform" in first
    assert "--buckets 1x32x32" in " ".join(runs[1]) and "--resize-mode crop" in " ".join(runs[1])
    with pytest.raises(UserError, match=r"2 of its 2 shard sets are not in shards yet \(first: shards/0-a\)\. Run ft "
                                        r"precompute with the same --dataset_config and --out shards first"):
        tr("train", "--dataset_config", str(config), "--shards", "shards")  # the parent: never a nested --out
    monkeypatch.chdir(tmp_path)
    for name in ("0-a", "1-b"):
        (tmp_path / "shards" / name).mkdir(parents=True)
        (tmp_path / "shards" / name / "manifest.json").write_text("{}")
    train = tr("train", "--dataset_config", str(config), "--shards", "shards").runs[0]
    assert [train[i + 1] for i, a in enumerate(train) if a == "--shards"] == ["shards/0-a:1", "shards/1-b:0.25"]
    check = tr("check-data", "--dataset_config", str(config), "--model_name", "cogvideox", "--rank", "8").runs
    assert len(check) == 2 and "--out" not in check[0] and "--buckets 1x32x32" in " ".join(check[1])


@pytest.mark.parametrize(("entry", "message"), [
    ({"data_root": "x", "dataset_type": "video", "video_resolution_buckets": [[9, 32, 32]], "shuffle": 1},
     "keys ft does not know: shuffle"),
    ({"data_root": "x", "dataset_type": "video"}, "needs video_resolution_buckets"),
    ({"data_root": "x", "dataset_type": "audio"}, "dataset_type must be"),
    ({"data_root": "x", "dataset_type": "video", "video_resolution_buckets": [[32, 32]]}, "not 3 positive"),
    ({"data_root": "x", "dataset_type": "video", "video_resolution_buckets": [[9, 32, 32]], "reshape_mode": "x"},
     "reshape_mode"),
])
def test_bad_dataset_configs_are_errors_that_name_the_problem(tmp_path, entry, message):
    with pytest.raises(UserError, match=message):
        read_dataset_config(write_config(tmp_path / "c.json", entry))


def test_a_hub_dataset_id_is_a_clear_error_offline(tmp_path, monkeypatch):
    from ft.precompute.dataset_config import local_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="finetrainers/crush-smol: not a local folder.*huggingface-cli download"):
        local_path("finetrainers/crush-smol", cache_dir=str(tmp_path))


def test_llm_caption_prefixes_are_stripped_as_finetrainers_strips_them():
    assert strip_llm_prefix("The video shows a cat jumping.") == "a cat jumping."
    assert strip_llm_prefix("In this video, a dog runs") == "a dog runs"
    assert strip_llm_prefix("A cat. The video shows") == "A cat. The video shows"


def test_docs_page_is_what_the_code_generates():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "finetrainers_doc.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_finetrainers_training_semantics_carry_over():
    """Micro-batch step counts, LTX's hard-coded first-frame conditioning, CogVideoX's uniform timesteps, one-word
    flags of other commands, and switches turned off in a config file (review findings)."""
    from ft.cli.finetrainers import translate
    from ft.cli.main import command_configs

    configs = command_configs()
    base = ["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--precomputation_dir", "s"]
    run = translate("train", ["--model_name", "cogvideox", *base, "--train_steps", "3000",
                              "--gradient_accumulation_steps", "4", "--checkpointing_steps", "500",
                              "--flow_weighting_scheme", "logit_normal"], None, configs).runs[0]
    assert run[run.index("--train-steps") + 1] == "750" and run[run.index("--checkpointing-steps") + 1] == "125"
    assert "--flow-weighting-scheme" not in run
    ltx = translate("train", ["--model_name", "ltx_video", *base], None, configs).runs[0]
    assert ltx[ltx.index("--first-frame-conditioning-p") + 1] == "0.1"
    generate = translate("generate", ["--model", "cogvideox", "--pretrained", "m", "--prompt", "x", "--seed", "7"],
                         None, configs).runs[0]
    assert generate[generate.index("--seed") + 1] == "7"
    off = translate("precompute", ["--model", "cogvideox", "--pretrained", "m", "--dataset", "d", "--out", "o"],
                    {"push_to_hub": False, "enable_tiling": False, "layerwise_upcasting_modules": []}, configs,
                    "c.yaml")
    assert "--vae-tiling" not in off.runs[0] or off.runs[0][off.runs[0].index("--vae-tiling") + 1:][:1] != ["true"]


def test_layerwise_upcasting_flags_carry_over_to_ft_train():
    run = tr("train", *MODEL, "--shards", "s", "--layerwise_upcasting_modules", "transformer",
             "--layerwise_upcasting_storage_dtype", "float8_e5m2", "--layerwise_upcasting_skip_modules_pattern",
             "norm", "^proj_out$").runs[0]
    assert run[run.index("--layerwise-upcasting-modules") + 1] == "transformer"
    assert run[run.index("--layerwise-upcasting-storage-dtype") + 1] == "float8_e5m2"
    patterns = [run[i + 1] for i, a in enumerate(run) if a == "--layerwise-upcasting-skip-modules-pattern"]
    assert patterns == ["norm", "^proj_out$"]


def test_compile_flags_carry_over_to_ft_train_and_a_bad_scope_is_refused():
    run = tr("train", *MODEL, "--shards", "s", "--compile_modules", "transformer", "--compile_scopes", "full").runs[0]
    assert run[run.index("--compile-modules") + 1] == "transformer"
    assert run[run.index("--compile-scopes") + 1] == "full"
    from ft.train.config import TrainConfig

    base = dict(model="cogvideox", pretrained="m", shards=["s"], output_dir="o")
    assert TrainConfig(**base, compile_modules=["transformer"]).compile_scopes == ["regional"]  # finetrainers' default
    with pytest.raises(UserError, match="--compile-scopes partial: use regional"):
        TrainConfig(**base, compile_modules=["transformer"], compile_scopes=["partial"])
    with pytest.raises(UserError, match="--compile-modules vae: ft train loads only the transformer"):
        TrainConfig(**base, compile_modules=["vae"])


def test_a_compile_scope_without_compile_modules_is_refused_not_ignored():
    """`ft train --compile-scopes full` alone trained eagerly with no word; the default scope alone (every saved
    train_config.json holds it) still loads."""
    from ft.train.config import TrainConfig

    base = dict(model="cogvideox", pretrained="m", shards=["s"], output_dir="o")
    with pytest.raises(UserError, match="--compile-scopes full: nothing is compiled without --compile-modules"):
        TrainConfig(**base, compile_scopes=["full"])
    with pytest.raises(UserError, match="--compile-scopes regional full: nothing is compiled"):
        TrainConfig(**base, compile_scopes=["regional", "full"])
    assert TrainConfig(**base, compile_scopes=["regional"]).compile_modules == []
    assert TrainConfig(**base, compile_modules=["transformer"], compile_scopes=["full"]).compile_scopes == ["full"]


def test_a_flag_without_its_value_and_a_bad_regex_are_clear_errors():
    with pytest.raises(UserError, match="--out needs a value"):
        tr("precompute", "--dataset", "d", "--out")
    with pytest.raises(UserError, match="--model_name needs a value"):
        tr("train", "--model_name")
    from ft.train.config import TrainConfig

    with pytest.raises(UserError, match="not a valid regex"):
        TrainConfig(model="cogvideox", pretrained="m", shards=["s"], output_dir="o", target_modules=["("])
