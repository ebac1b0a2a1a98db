"""finetrainers' command line, carried over: every flag of its args.py read with finetrainers' meaning.

`translate(command, argv, config, configs)` turns a finetrainers (or ft) argument list, plus the keys of a
`--config` file, into the plain ft argument lists the command runs. One argument list drives both stages:
- a flag of this command is kept, under its ft name (`--pretrained_model_name_or_path` -> `--pretrained`);
- a flag of the other stage is accepted and named once, in one info line ("left to ft train: --rank, --lr");
- a flag with nothing to do in ft is accepted where its value asks for nothing ft lacks (`--pp_degree 1`,
  `--enable_precomputation`), and refused with the reason and the ft way otherwise;
- a misspelt flag gets a "did you mean" only for a near spelling, and a finetrainers flag always its ft name.
`--dataset_config training.json` makes `ft precompute` one run per dataset (precompute/dataset_config.py) and gives
`ft train` the datasets' shard sets with their weights. What ft does with each flag is the table in
finetrainers_flags.py (`FLAGS`), which docs/finetrainers.md is generated from; where finetrainers trained a family
otherwise than ft's defaults, the spec says how (`ModelSpec.finetrainers_*`), so nothing here names a family.

Spelling decides one clash: `--batch_size` (finetrainers' spelling) is the training batch, left to `ft train` by
`ft precompute`, whose own encoding batch is `--batch-size`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.common.config import flag_name, is_list
from ft.common.errors import UserError
from ft.common.shards import MANIFEST_NAME
from ft.pipelines.registry import SPECS
from ft.precompute.dataset_config import read_dataset_config

from .finetrainers_flags import CHECK, ESTIMATE, FLAGS, HINTS, NOT_YET, RESOLUTION_FLAGS, Flag, P, T

# ---------------------------------------------------------------------------------------------- reading argv


@dataclass
class Entry:
    """One flag as given: its spelling (`--batch_size`), its values, and where it came from."""

    spelling: str
    values: list[str]
    origin: str = "command line"

    @property
    def key(self) -> str:
        return self.spelling.lstrip("-").replace("-", "_")

    @property
    def finetrainers_spelling(self) -> bool:
        return "-" not in self.spelling.lstrip("-")


@dataclass
class Fields:
    """The settings of each ft command: name -> "bool", "list" or "value"."""

    by_command: dict[str, dict[str, str]]

    @classmethod
    def of(cls, configs: dict[str, type]) -> Fields:
        out = {}
        for command, config_cls in configs.items():
            hints = typing.get_type_hints(config_cls)
            out[command] = {f.name: "bool" if hints[f.name] is bool else "list" if is_list(hints[f.name])
                            else "value" for f in dataclasses.fields(config_cls) if f.init}
        return cls(out)

    def arity(self, key: str, command: str) -> int | str | None:
        for cmd in (command, *self.by_command):
            kind = self.by_command[cmd].get(key.removeprefix("no_"))
            if kind:
                return 0 if kind == "bool" else "+" if kind == "list" else 1
        return None


def _looks_like_flag(token: str) -> bool:
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
        return False
    except ValueError:
        return True


def read_argv(argv: list[str], command: str, fields: Fields) -> list[Entry]:
    """Split `--flag values...` into entries, with each flag's arity from ft's configs or finetrainers' table."""
    entries: list[Entry] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not _looks_like_flag(token):
            raise UserError(f"ft {command}: unexpected argument {token!r} (flags are --name value).")
        name, eq, inline = token.partition("=")
        entry = Entry(name, [inline] if eq else [])
        flag = FLAGS.get(entry.key) if entry.finetrainers_spelling else None
        arity = fields.arity(entry.key, command) if flag is None else flag.nargs
        if arity is None and entry.key in FLAGS:
            arity = FLAGS[entry.key].nargs
        i += 1
        if not eq and arity != 0:
            while i < len(argv) and not _looks_like_flag(argv[i]):
                entry.values.append(argv[i])
                i += 1
                if arity == 1:
                    break
            if arity is not None and not entry.values:  # `--out $UNSET` must not become a folder named "true"
                raise UserError(f"{name} needs a value (ft {command}).")
        entries.append(entry)
    return entries


def config_entries(values: dict[str, Any], path: str) -> list[Entry]:
    """A --config file's keys as entries (a list value is several values; true/false switch a flag)."""
    out = []
    for key, value in values.items():
        if value is None:
            continue
        vals = [str(v) for v in value] if isinstance(value, list) else [str(value).lower() if isinstance(value, bool)
                                                                        else str(value)]
        out.append(Entry("--" + str(key).lstrip("-"), vals, origin=f"--config {path}"))
    return out


# ---------------------------------------------------------------------------------------------- translating


@dataclass
class Translation:
    """What a command runs: one ft argument list per run (several for a multi-dataset precompute)."""

    runs: list[list[str]]
    left_to: dict[str, list[str]] = field(default_factory=dict)
    not_needed: list[str] = field(default_factory=list)
    not_yet: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    effects: dict[str, str] = field(default_factory=dict)

    def info_lines(self) -> list[str]:
        lines = [f"left to ft {cmd}: {', '.join(dict.fromkeys(flags))}" for cmd, flags in self.left_to.items()]
        if self.not_needed:
            lines.append(f"accepted, nothing to do in ft (docs/finetrainers.md says why): {', '.join(self.not_needed)}")
        if self.not_yet:
            lines.append(f"accepted, asking for nothing ft lacks (ft does not have these yet): "
                         f"{', '.join(self.not_yet)}")
        return lines + self.notes


def _edits(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) that turn `a` into `b`."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def _suggest(entry: Entry, command: str, fields: Fields) -> str | None:
    """A near spelling of one flag of `command` (with its ft name, for a finetrainers flag), or None."""
    names = {flag_name(n)[2:]: n for n in fields.by_command[command]}
    names.update({n.replace("_", "-"): n for n in FLAGS})
    typed = entry.key.replace("_", "-")
    near = [n for n in names if _edits(typed, n) <= max(1, len(n) // 8)]  # a typo or two, never another flag
    if not near:
        return None
    name = names[min(near, key=lambda n: (_edits(typed, n), n))]
    flag = FLAGS.get(name)
    if flag and name not in fields.by_command[command]:
        return f"--{name}" + (f" (ft: {flag_name(flag.ft)})" if flag.ft and flag.ft != name else "")
    return flag_name(name)


def _check_value(flag: Flag, entry: Entry) -> None:
    if flag.check is None:
        return
    if flag.nargs == 0 and entry.values and entry.values[0].strip().lower() in ("false", "0", "no", "off"):
        return  # a switch turned off (a config file's `push_to_hub: false`) asks for nothing
    if flag.nargs == "+" and entry.values == []:
        return  # an empty list (`layerwise_upcasting_modules: []`) asks for nothing
    values = entry.values or ["true"]
    reason = flag.check(values)
    if reason:
        raise UserError(reason if entry.origin == "command line" else f"{entry.origin}: {reason}")


def translate(command: str, argv: list[str], config: dict[str, Any] | None, configs: dict[str, type],
              config_path: str = "", before_precompute: bool = False) -> Translation:
    """Turn `argv` (after the command name) plus a --config file's keys into the ft runs of `command`.

    `before_precompute`: the flags are checked before the shards are written (`ft run`), so a --dataset_config's
    shard sets need not exist yet.

    Command-line flags override the file's keys; within one of them, a list setting given by several flags (video
    and image buckets) collects them all."""
    fields = Fields.of(configs)
    result = Translation(runs=[])
    finetrainers: dict[str, list[str]] = {}
    by_origin = []
    for entries in (config_entries(config or {}, config_path), read_argv(argv, command, fields)):
        settings: dict[str, list[str]] = {}
        for entry in entries:
            for name, values in _resolve(entry, command, fields, result, finetrainers):
                if name.startswith("@"):
                    result.effects[name[1:]] = values[0]
                elif fields.by_command[command].get(name) == "list" and name in settings:
                    settings[name] = settings[name] + values
                else:
                    settings[name] = values
        by_origin.append(settings)
    settings = {**by_origin[0], **by_origin[1]}
    _special_cases(command, settings, finetrainers, result, fields.by_command[command], before_precompute)
    return result


def _resolve(entry: Entry, command: str, fields: Fields, result: Translation, finetrainers: dict[str, list[str]]
             ) -> list[tuple[str, list[str]]]:
    """The ft settings one entry gives `command` (none when it is left to the other stage or not needed)."""
    own = fields.by_command[command]
    stages = (P, T) if command in (P, T, CHECK) else (command,)
    key = entry.key
    bare = key.removeprefix("no_") if key not in own else key
    # a one-word flag (--seed, --rank) that the command itself has is the command's own; only underscore
    # spellings (--batch_size) are finetrainers' meaning whatever the command
    ambiguous = ("_" not in entry.spelling.lstrip("-") and bare in own and key in FLAGS
                 and command not in FLAGS[key].stages)
    flag = FLAGS.get(key) if (entry.finetrainers_spelling and not ambiguous) or bare not in own else None
    if flag is not None:
        _check_value(flag, entry)
        # a capability still being built is there once a command of its stages has the field (not another
        # command: `ft estimate --dp-shards` does not make sharded training exist)
        available = flag.verdict != NOT_YET or any(flag.ft in fields.by_command.get(stage, {})
                                                   for stage in flag.stages)
        if not available:
            result.not_yet.append(entry.spelling)
            return []
        # ft estimate's flags are ft train's, spelled alike (cli/estimate.py): a finetrainers spelling of one
        # means there what it means to ft train
        if command not in flag.stages and not (command == CHECK and P in flag.stages
                                                and (flag.ft in own or key == "dataset_config")) and not (
                command == ESTIMATE and T in flag.stages and flag.ft in own):
            _leave(result, flag, entry, command, stages)
            return []
        finetrainers[key] = entry.values
        if flag.convert:
            try:
                return flag.convert(entry.values)
            except (IndexError, ValueError, TypeError) as e:
                raise UserError(f"{entry.spelling} {' '.join(entry.values)}: not a value it takes ({e}).") from e
        return [(flag.ft, entry.values or ["true"])] if flag.ft else []  # no ft: read by _special_cases
    if bare in own:
        if own[bare] == "list":  # ft's list flags also take comma-separated values
            return [(bare, [p.strip() for v in entry.values for p in v.split(",") if p.strip()])]
        return [(bare, ["false"] if key != bare else (entry.values or ["true"]))]
    other = next((c for c in stages if c != command and bare in fields.by_command[c]), None)
    if other:
        result.left_to.setdefault(other, []).append(entry.spelling)
        return []
    where = next((c for c, f in fields.by_command.items() if bare in f), None)
    close = None if where else HINTS.get(key) or _suggest(entry, command, fields)
    hint = f"; it is a flag of ft {where}" if where else f"; did you mean {close}?" if close else ""
    if entry.origin != "command line":
        hint = hint.replace(f"{close}?", f"{close[2:]!r}?") if close and close.startswith("--") else hint
        raise UserError(f"{entry.origin}: {key!r} is not a setting of this command{hint}")
    raise UserError(f"No such option: {entry.spelling} (ft {command}){hint}{'' if close else '.'}")


def _leave(result: Translation, flag: Flag, entry: Entry, command: str, stages: tuple[str, ...]) -> None:
    other = next((s for s in flag.stages if s in stages and s != command), None)
    if other:
        result.left_to.setdefault(other, []).append(entry.spelling)
    elif flag.stages:
        raise UserError(f"{entry.spelling} is a flag of ft {' and ft '.join(flag.stages)}, not ft {command}.")
    else:
        result.not_needed.append(entry.spelling)


def _special_cases(command: str, settings: dict[str, list[str]], finetrainers: dict[str, list[str]],
                   result: Translation, kinds: dict[str, str], before_precompute: bool = False) -> None:
    target = {P: "out", T: "shards"}.get(command)
    if "precomputation_dir" in finetrainers and target:
        given = settings.get(target)
        value = finetrainers["precomputation_dir"]
        if given and given != value:
            raise UserError(f"--precomputation_dir {value[0]} and --{target} {' '.join(given)} name different "
                            f"folders; give one (ft's --{target}).")
        settings[target] = value
    if command == T:
        _finetrainers_training_semantics(settings, finetrainers, result)
    if command == T and "max_data_samples" in finetrainers:
        try:
            samples = int(finetrainers["max_data_samples"][0])
            per_step = int(settings.get("batch_size", ["1"])[0]) * int(settings.get("gradient_accumulation_steps",
                                                                                     ["1"])[0])
            steps = int(settings.get("train_steps", ["1000"])[0])
        except (IndexError, ValueError) as e:
            raise UserError(f"--max_data_samples, --batch_size, --gradient_accumulation_steps and --train_steps take "
                            f"whole numbers ({e}).") from e
        if -(-samples // per_step) < steps:  # finetrainers goes on while fewer samples were seen: ceil
            settings["train_steps"] = [str(max(1, -(-samples // per_step)))]
            result.notes.append(f"--max_data_samples {samples}: training stops after {settings['train_steps'][0]} "
                                f"steps of {per_step} samples")
    if "dataset_config" in finetrainers and command in (P, T, CHECK):
        datasets = read_dataset_config(finetrainers["dataset_config"][0])
        if command in (P, CHECK):  # check-data checks each dataset as precompute would encode it
            result.runs = _precompute_runs(settings, datasets, kinds, with_out=command == P)
            return
        if not before_precompute:
            _mix_shards(settings, datasets)
    result.runs = [to_argv(settings, kinds)]


def _finetrainers_training_semantics(settings: dict[str, list[str]], finetrainers: dict[str, list[str]],
                                     result: Translation) -> None:
    """Where a finetrainers-spelled training flag means something else than ft's flag, translate the value.

    - finetrainers counts --train_steps, --checkpointing_steps, --logging_steps and --validation_steps in
      micro-batches (its step
      counter goes up per batch; the optimizer steps every --gradient_accumulation_steps); ft counts optimizer
      steps, so those values are divided by the accumulation (rounded up).
    - where finetrainers trains a family otherwise than ft's defaults, the family's spec says how, and a run
      carried over with --model_name trains as it did there: first-frame conditioning at the p finetrainers
      hard-codes (`finetrainers_first_frame_conditioning_p`: LTX-Video's 0.1; ft's default is 0); timesteps
      sampled uniformly whatever --flow_weighting_scheme says (`finetrainers_uniform_timesteps`: CogVideoX), so a
      carried-over scheme is dropped (pass --flow-weighting-scheme to choose one).
    """
    try:
        accumulation = int(settings.get("gradient_accumulation_steps", ["1"])[0])
    except ValueError:
        return  # ft train's own parser names the bad value
    if accumulation > 1:
        for name in ("train_steps", "checkpointing_steps", "logging_steps", "validation_steps"):
            if name in finetrainers and name in settings and settings[name][0].isdigit():
                micro = int(settings[name][0])
                settings[name] = [str(max(1 if micro else 0, -(-micro // accumulation)))]
                result.notes.append(f"--{name} {micro}: finetrainers counts micro-batches, ft optimizer steps; "
                                    f"{settings[name][0]} steps of {accumulation} micro-batches")
    spec = SPECS.get((settings.get("model") or [""])[0])
    p = spec.finetrainers_first_frame_conditioning_p if spec else 0.0
    if "model_name" in finetrainers and p and "first_frame_conditioning_p" not in settings:
        settings["first_frame_conditioning_p"] = [f"{p:g}"]
        result.notes.append(f"{spec.display_name}: first-frame conditioning at p = {p:g}, as finetrainers trains it")
    if spec and spec.finetrainers_uniform_timesteps and "flow_weighting_scheme" in finetrainers:
        dropped = settings.pop("flow_weighting_scheme")[0]
        result.notes.append(f"--flow_weighting_scheme {dropped}: finetrainers samples {spec.display_name} timesteps "
                            "uniformly whatever the scheme, and so does this run (--flow-weighting-scheme picks a "
                            "density in ft)")
    # finetrainers parses its shift knobs and never applies them; ft refuses a knob that would do nothing (the
    # resolution knobs without --flow-resolution-shifting, --flow-shift beside it), so a script's leave the run
    shifting = (settings.get("flow_resolution_shifting") or ["false"])[0].lower() in ("true", "1", "yes")
    idle = [name for name in RESOLUTION_FLAGS if name in finetrainers and name in settings] if not shifting else (
        ["flow_shift"] if "flow_shift" in finetrainers and "flow_shift" in settings else [])
    for name in idle:
        dropped = settings.pop(name)[0]
        result.notes.append(f"--{name} {dropped}: finetrainers never applies it, and "
                            f"{'without' if not shifting else 'beside'} --flow_resolution_shifting it means nothing "
                            "to this run either; left out")


def _precompute_runs(settings: dict[str, list[str]], datasets: list[Any], kinds: dict[str, str],
                     with_out: bool = True) -> list[list[str]]:
    from ft.precompute.dataset_config import local_path

    for clash in ("dataset", "buckets", "id_token", "resize_mode"):
        if clash in settings:
            raise UserError(f"--dataset_config gives each dataset's {clash.replace('_', ' ')}; leave out "
                            f"{flag_name(clash)} (or --dataset_config).")
    if "out" not in settings and with_out:
        raise UserError("ft precompute needs --out (or --precomputation_dir): the folder for the shards.")
    runs = []
    several = len(datasets) > 1
    for d in datasets:
        run = dict(settings)
        run["dataset"] = [local_path(d.source, (settings.get("cache_dir") or [None])[0])]
        run["buckets"] = d.buckets
        run["resize_mode"] = [d.resize_mode]
        run.setdefault("frame_sampling", ["uniform"])  # finetrainers spreads the frames it keeps over the clip
        if with_out:
            run["out"] = [d.shard_folder(settings["out"][0], several)]
        if d.id_token:
            run["id_token"] = [d.id_token]
        if d.strip_llm_prefixes:
            run["strip_llm_prefixes"] = ["true"]
        if d.caption_columns:
            run["caption_column"] = [d.caption_columns[0]]
        runs.append(to_argv(run, kinds))
    return runs


def _mix_shards(settings: dict[str, list[str]], datasets: list[Any]) -> None:
    shards = settings.get("shards", [])
    if len(datasets) < 2 or len(shards) != 1 or (Path(shards[0]) / MANIFEST_NAME).is_file():
        return
    absent = [d.shard_folder(shards[0], True) for d in datasets
              if not (Path(d.shard_folder(shards[0], True)) / MANIFEST_NAME).is_file()]
    if absent:  # say which --out makes them: the parent, never a dataset's own folder (that would nest)
        raise UserError(f"--dataset_config: {len(absent)} of its {len(datasets)} shard sets are not in "
                        f"{shards[0]} yet (first: {absent[0]}). Run ft precompute with the same --dataset_config and "
                        f"--out {shards[0]} first: it writes one shard set per dataset under it.")
    settings["shards"] = [f"{d.shard_folder(shards[0], True)}:{d.weight:g}" for d in datasets]


def to_argv(settings: dict[str, list[str]], kinds: dict[str, str]) -> list[str]:
    """Settings as an ft argument list (`--name value`, `--flag`/`--no-flag`, a list flag once per value)."""
    argv: list[str] = []
    for name, values in settings.items():
        flag = flag_name(name)
        if kinds.get(name) == "bool":
            on = values[-1].lower() not in ("false", "0", "no") if values else True
            argv.append(flag if on else f"--no-{flag[2:]}")
        else:
            for v in values:
                argv += [flag, v]
    return argv


def apply_effects(effects: dict[str, str]) -> None:
    """Process-wide settings some finetrainers flags ask for: library log levels, TF32, matmul precision."""
    if "FT_LIBRARY_VERBOSITY" in effects:
        level = {"0": "warning", "1": "info", "2": "debug", "3": "debug"}.get(effects["FT_LIBRARY_VERBOSITY"])
        if level is None:
            raise UserError(f"--verbose {effects['FT_LIBRARY_VERBOSITY']}: use 0, 1, 2 or 3.")
        os.environ["FT_LIBRARY_VERBOSITY"] = level
    if "FT_ALLOW_TF32" in effects or "FT_FLOAT32_MATMUL_PRECISION" in effects:
        import torch

        if "FT_ALLOW_TF32" in effects and effects["FT_ALLOW_TF32"].lower() not in ("false", "0"):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        precision = effects.get("FT_FLOAT32_MATMUL_PRECISION")
        if precision:
            if precision not in ("highest", "high", "medium"):
                raise UserError(f"--float32_matmul_precision {precision}: use highest, high or medium.")
            torch.set_float32_matmul_precision(precision)
