"""Wan 2.2 A14B's two experts (pipelines/wan_experts.py) against diffusers' own WanPipeline: the expert ft trains at
a timestep is the one the pipeline calls there, an expert run's draws stay on its side of the boundary, ft's
training call of each expert is what the pipeline feeds it, and the pipelines ft builds hold both experts."""

from __future__ import annotations

import pytest
import torch

from ft.common.errors import UserError
from ft.common.model_args import ModelArgs
from ft.pipelines.base import StepInputs
from ft.pipelines.registry import get_spec
from ft.pipelines.wan_experts import ExpertSplit, parse_expert, read_split, tiny_a14b_components
from ft.train.objectives import FlowMatching, SigmaSampler
from helpers import Calls, assert_same_call

PROMPT = "a red circle moving left to right on a dark background"
# timesteps around both published boundaries (875 text-to-video, 900 image-to-video) and across the schedule
SWEEP = [1000, 999, 950, 901, 900, 899, 876, 875, 874, 800, 500, 100, 1]


def fp32_args(folder) -> ModelArgs:
    return ModelArgs(model="wan", pretrained=str(folder), transformer_dtype="fp32", vae_dtype="fp32",
                     text_encoder_dtype="fp32")


def expert_spec(folder, expert: str | None, trains: bool = True):
    return get_spec("wan").with_pretrained(str(folder)).select_expert(str(folder), expert, trains)


@pytest.fixture(scope="module")
def a14b_i2v_ratio(tmp_path_factory):
    """The tiny two-expert Wan with image-to-video's boundary_ratio 0.9."""
    from diffusers import WanPipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-wan2.2-a14b-0.9"
    WanPipeline(**tiny_a14b_components(0, boundary_ratio=0.9)).save_pretrained(folder)
    return folder


def sweep_scheduler(config):
    """The model's UniPC scheduler handing the pipeline SWEEP as its timesteps (its sigmas are left as set)."""
    from diffusers import UniPCMultistepScheduler

    class Sweep(UniPCMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(len(SWEEP), device=device)
            self.timesteps = torch.tensor(SWEEP, dtype=torch.int64, device=device)

    return Sweep.from_config(config)


@pytest.mark.parametrize("ratio", [0.875, 0.9])
def test_the_expert_ft_trains_at_each_timestep_is_the_one_the_pipeline_calls(ratio, tiny_wan_a14b, a14b_i2v_ratio):
    """WanPipeline run over a sweep of timesteps that straddles the boundary: at each, the transformer it calls is
    the expert whose ft run trains that timestep (and only that one)."""
    from diffusers import WanPipeline

    folder = tiny_wan_a14b if ratio == 0.875 else a14b_i2v_ratio
    split = read_split(str(folder))
    assert split == ExpertSplit(ratio, 1000)
    pipe = WanPipeline.from_pretrained(folder)
    pipe.scheduler = sweep_scheduler(pipe.scheduler.config)
    embeds = torch.randn(1, 512, 32)
    with torch.no_grad(), Calls(pipe.transformer) as high, Calls(pipe.transformer_2) as low:
        pipe(prompt_embeds=embeds, num_frames=5, height=32, width=32, num_inference_steps=len(SWEEP),
             guidance_scale=1.0, output_type="latent")
    called = {int(c["timestep"][0]): "high" for c in high} | {int(c["timestep"][0]): "low" for c in low}
    assert sorted(called, reverse=True) == SWEEP  # one call per step, each at its timestep
    boundary = round(ratio * 1000)
    assert {t for t, e in called.items() if e == "high"} == {t for t in SWEEP if t >= boundary}
    filters = {expert: expert_spec(folder, expert).timestep_filter() for expert in ("high", "low")}
    for t, expert in called.items():
        assert split.expert_at(t) == expert
        # the objective's timestep for this t (sigma = t / 1000), as the trainer hands it to the filter
        timestep = FlowMatching(None, SigmaSampler()).timesteps_of(torch.tensor([t / 1000]))
        assert timestep.long().item() == t
        assert {e: bool(f(timestep)[0]) for e, f in filters.items()} == {e: e == expert for e in filters}


@pytest.mark.parametrize("scheme,shift", [("none", 1.0), ("none", 5.0), ("logit_normal", 1.0), ("mode", 3.0)])
def test_an_experts_timestep_draws_never_cross_the_boundary(tiny_wan_a14b, scheme, shift):
    """Each expert's draws (rejection from the run's density, from each sample's own generator) stay on its side of
    WanPipeline's switch; they are the run's density conditioned on the range (the same draws as the unfiltered
    sampler's, kept where they fall in the range), and a sample's draw does not depend on its batch."""
    sampler = SigmaSampler(scheme, shift=shift)
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(3000)]  # noqa: E731
    free = FlowMatching(None, sampler).sample_sigmas(generators(), 256)
    for expert in ("high", "low"):
        objective = FlowMatching(None, sampler, accept=expert_spec(tiny_wan_a14b, expert).timestep_filter())
        sigmas = objective.sample_sigmas(generators(), 256)
        timesteps = objective.timesteps_of(sigmas).long()
        assert bool((timesteps >= 875).all()) if expert == "high" else bool((timesteps < 875).all())
        inside = free[(free * 1000).long() >= 875] if expert == "high" else free[(free * 1000).long() < 875]
        assert len(inside) > 50
        # each sample's first draw in the range is its unfiltered draw when that one is in range (drawn alone, not
        # in a batch: a vectorised sigmoid may round the last bit otherwise)
        kept = ((free * 1000).long() >= 875) == (expert == "high")
        torch.testing.assert_close(sigmas[kept], free[kept], rtol=1e-6, atol=0)
        assert abs(sigmas.mean() - inside.mean()) < 0.02  # the conditioned density, not a rescaled one
        alone = objective.sample_sigmas([torch.Generator().manual_seed(7)], 256)
        assert torch.equal(alone, sigmas[7:8])


def test_a_density_that_misses_the_experts_range_is_a_clear_error(tiny_wan_a14b):
    sampler = SigmaSampler("logit_normal", logit_mean=12.0, logit_std=0.01)  # sigma ~ 0 always
    objective = FlowMatching(None, sampler, accept=expert_spec(tiny_wan_a14b, "high").timestep_filter())
    with pytest.raises(UserError, match=r"no sigma in 10000 draws .*--flow-logit-mean 12.0"):
        objective.sample_sigmas([torch.Generator().manual_seed(0)], 256)


@pytest.mark.parametrize("expert", ["high", "low"])
def test_predict_makes_the_call_the_pipeline_makes_of_each_expert(expert, tiny_wan_a14b):
    """A real 6-step WanPipeline run (classifier-free guidance, UniPC at flow_shift 3: timesteps 999, 937 with the
    high-noise expert, 857 ... 376 with the low-noise one): every call of the expert is made again through ft's
    predict with the transformer ft's --expert run loads (transformer/ or transformer_2/): the same keyword
    arguments, bitwise, the same output, and a timestep that run trains."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan_a14b)
    spec = expert_spec(tiny_wan_a14b, expert)
    ours = spec.load_component("transformer", fp32_args(tiny_wan_a14b))
    theirs_model = pipe.transformer if expert == "high" else pipe.transformer_2
    other = pipe.transformer_2 if expert == "high" else pipe.transformer
    state, other_state = ours.state_dict(), other.state_dict()
    assert all(torch.equal(v, theirs_model.state_dict()[k]) for k, v in state.items())
    assert not all(torch.equal(v, other_state[k]) for k, v in state.items())  # the experts differ
    with torch.no_grad():
        cond = pipe._get_t5_prompt_embeds([PROMPT], max_sequence_length=512, device="cpu")
        uncond = pipe._get_t5_prompt_embeds([""], max_sequence_length=512, device="cpu")
        with Calls(theirs_model) as theirs:
            pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_frames=9, height=32, width=32,
                 num_inference_steps=6, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                 output_type="latent")
    steps = [int(t) for t in pipe.scheduler.timesteps]
    assert steps == [999, 937, 857, 750, 600, 376]
    mine = [i for i, t in enumerate(steps) if (t >= 875) == (expert == "high")]
    assert len(theirs) == 2 * len(mine)  # each of the expert's steps: conditional, unconditional
    objective = FlowMatching(None, SigmaSampler(), accept=spec.timestep_filter())
    for n, call in enumerate(theirs):
        noisy, sigma = call["hidden_states"], pipe.scheduler.sigmas[mine[n // 2]].view(1)
        _, timesteps = objective.noised(noisy, torch.zeros_like(noisy), sigma)
        assert bool(objective.accept(timesteps)[0])
        step = StepInputs(noisy, torch.zeros_like(noisy), noisy, sigma, timesteps,
                          {"prompt_embeds": cond if n % 2 == 0 else uncond}, [{}], [torch.Generator()])
        with torch.no_grad(), Calls(ours) as made:
            output, _ = spec.predict(ours, step, torch.float32)
            expected = theirs_model(**call)[0]
        assert_same_call(made[0], call)
        assert torch.equal(output, expected)


def test_the_pipelines_ft_builds_hold_both_experts(tiny_wan_a14b):
    """ft generate's pipeline is diffusers' from_pretrained one (both experts, the boundary); validation's, in an
    expert run, holds the live trained expert and the other expert's base weights."""
    from diffusers import WanPipeline

    args = fp32_args(tiny_wan_a14b)
    reference = WanPipeline.from_pretrained(tiny_wan_a14b)
    generate = expert_spec(tiny_wan_a14b, None, trains=False).load_pipeline(args, "cpu")
    assert generate.config.boundary_ratio == 0.875
    for name in ("transformer", "transformer_2"):
        a, b = getattr(generate, name).state_dict(), getattr(reference, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for expert in ("high", "low"):
        spec = expert_spec(tiny_wan_a14b, expert)
        spec._expert_args = args
        live = spec.load_component("transformer", args)
        pipe = spec.build_pipeline(live, spec.load_component("vae", args), spec.pipeline_scheduler(args))
        trained, other = ("transformer", "transformer_2") if expert == "high" else ("transformer_2", "transformer")
        assert getattr(pipe, trained) is live and pipe.config.boundary_ratio == 0.875 and pipe.text_encoder is None
        base = getattr(reference, other).state_dict()
        assert all(torch.equal(v, base[k]) for k, v in getattr(pipe, other).state_dict().items())


def test_expert_flags_are_checked_against_the_model(tiny_wan_a14b, tiny_wan, tiny_cog):
    """A two-expert folder in ft train needs --expert (one message with the choices); a one-transformer Wan and
    other families refuse it; `both` gets the two-job recipe; musubi-tuner's spellings are accepted."""
    from helpers import run_cli

    common = ["--shards", "unused", "--output-dir", "unused"]
    with pytest.raises(UserError, match=r"two-expert Wan 2.2 \(boundary_ratio 0.875\): each run trains one expert; "
                                        r"pass --expert high \(transformer/, the timesteps >= 875\) or --expert low "
                                        r"\(transformer_2/, the timesteps < 875\)"):
        run_cli(["train", "--model", "wan", "--pretrained", tiny_wan_a14b, *common])
    with pytest.raises(UserError, match=r"--expert high: --pretrained .* has one transformer .*drop --expert"):
        run_cli(["train", "--model", "wan", "--pretrained", tiny_wan, "--expert", "high", *common])
    with pytest.raises(UserError, match=r"--expert: CogVideoX has one transformer"):
        run_cli(["train", "--model", "cogvideox", "--pretrained", tiny_cog, "--expert", "low", *common])
    with pytest.raises(UserError, match=r"--expert both: ft trains one expert per run .*--expert high --output-dir "
                                        r"out/high.*--expert low --output-dir out/low.*--lora-2 out/low"):
        run_cli(["train", "--model", "wan", "--pretrained", tiny_wan_a14b, "--expert", "both", *common])
    with pytest.raises(UserError, match=r"--expert middle: not an expert"):
        parse_expert("middle")
    assert [parse_expert(v) for v in ("high_noise", "Low-Noise", "transformer_2", "HIGH")] == [
        "high", "low", "low", "high"]
    assert expert_spec(tiny_wan_a14b, "low_noise").expert == "low"
    # precompute and generate take the folder as it is (one shard set serves both experts)
    assert expert_spec(tiny_wan_a14b, None, trains=False).split == ExpertSplit(0.875)
