"""The shared objectives: every sigma knob acts on the sampled sigmas or the loss weights, and each sample's
randomness is its own."""

from __future__ import annotations

import math

import pytest
import torch

from ft.train.objectives import (
    DDPMVPrediction,
    FlowMatching,
    SigmaSampler,
    flow_loss_weights,
    sample_generator,
)

N = 4000


def sigmas(seq_len: int = 1024, **knobs) -> torch.Tensor:
    generators = [sample_generator(0, 1, f"key{i}") for i in range(N)]
    return SigmaSampler(**knobs).sample(generators, seq_len)


def test_uniform_by_default():
    s = sigmas()
    assert 0.45 < s.mean() < 0.55 and s.min() >= 1e-3 and s.max() <= 1
    assert abs((s < 0.25).float().mean() - 0.25) < 0.03


def test_logit_normal_mean_and_std_act():
    base = sigmas(scheme="logit_normal")
    assert abs(base.median() - 0.5) < 0.03 and abs((base < 0.25).float().mean() - 0.25) > 0.05  # not uniform
    # sigma = 1 - u, as the reference scripts index their descending sigma table: a positive mean, less noise
    assert sigmas(scheme="logit_normal", logit_mean=1.0).median() < 0.35  # 1 - sigmoid(1) = 0.27
    narrow = sigmas(scheme="logit_normal", logit_std=0.2)
    assert narrow.std() < 0.5 * base.std()


def test_mode_scale_acts():
    assert not torch.allclose(sigmas(scheme="mode", mode_scale=0.0), sigmas(scheme="mode", mode_scale=1.29))
    # mode_scale 0 is uniform (1 - u), 1.29 moves mass towards the middle
    middle = lambda s: ((s > 0.3) & (s < 0.7)).float().mean()  # noqa: E731
    assert middle(sigmas(scheme="mode", mode_scale=1.29)) > middle(sigmas(scheme="mode", mode_scale=0.0)) + 0.05


def test_weighting_schemes_that_only_weight_draw_uniformly():
    for scheme in ("sigma_sqrt", "cosmap"):
        torch.testing.assert_close(sigmas(scheme=scheme), sigmas())


def test_flow_shift_moves_sigmas_towards_noise():
    plain, shifted = sigmas(), sigmas(shift=3.0)
    assert shifted.mean() > plain.mean() + 0.1
    u = 0.25
    expected = 3 * u / (1 + 2 * u)
    s = SigmaSampler(shift=3.0).shifted(torch.tensor([u]), 0)
    assert s.item() == pytest.approx(expected)


def test_resolution_shifting_follows_the_sequence_length_and_each_of_its_knobs():
    on = {"resolution_shifting": True}
    short, long = sigmas(seq_len=256, **on), sigmas(seq_len=4096, **on)
    assert long.mean() > short.mean()
    # mu at the base length is base_shift: sigma = e^mu / (e^mu + 1/u - 1)
    u = torch.tensor([0.5])
    assert SigmaSampler(**on).shifted(u, 256).item() == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 1))
    reference = SigmaSampler(**on).shifted(u, 1024).item()
    for knob, value in [("base_seq_len", 512), ("max_seq_len", 8192), ("base_shift", 0.1), ("max_shift", 3.0)]:
        assert SigmaSampler(**on, **{knob: value}).shifted(u, 1024).item() != pytest.approx(reference), knob
    # --flow-shift is ignored when resolution shifting is on
    assert SigmaSampler(**on, shift=5.0).shifted(u, 1024).item() == pytest.approx(reference)


def test_flow_loss_weights():
    s = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(flow_loss_weights("none", s), torch.ones(3))
    torch.testing.assert_close(flow_loss_weights("logit_normal", s), torch.ones(3))
    torch.testing.assert_close(flow_loss_weights("sigma_sqrt", s), s**-2)
    torch.testing.assert_close(flow_loss_weights("cosmap", s), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))


def test_flow_matching_noises_and_targets():
    objective = FlowMatching(None, SigmaSampler(scheme="sigma_sqrt"))
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    s = torch.tensor([0.25, 1.0])
    noisy, t = objective.noised(x0, noise, s)
    torch.testing.assert_close(noisy[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(noisy[1], noise[1])
    assert t.tolist() == [250.0, 1000.0]
    torch.testing.assert_close(objective.target(x0, noise), noise - x0)
    torch.testing.assert_close(objective.weights(s, t), s**-2)


def test_the_density_applies_to_cogvideox_timesteps():
    from diffusers import CogVideoXDDIMScheduler

    generators = [sample_generator(0, 1, f"k{i}") for i in range(N)]
    scheduler = CogVideoXDDIMScheduler()
    uniform = DDPMVPrediction(scheduler, SigmaSampler())
    t = uniform.noised(torch.zeros(N, 1), torch.zeros(N, 1), uniform.sample_sigmas(generators, 1))[1]
    assert t.min() >= 0 and t.max() <= 999 and 450 < t.float().mean() < 550
    assert t.min() < 10  # uniform reaches the low timesteps, as torch.randint(0, 1000) did
    peaked = DDPMVPrediction(scheduler, SigmaSampler(scheme="logit_normal", logit_std=0.3))
    t2 = peaked.noised(torch.zeros(N, 1), torch.zeros(N, 1), peaked.sample_sigmas(generators, 1))[1]
    assert t2.float().std() < 0.5 * t.float().std()


def test_a_samples_generator_depends_only_on_seed_step_and_key():
    def draw(seed, step, key):
        return torch.randn(3, generator=sample_generator(seed, step, key))

    assert torch.equal(draw(1, 2, "a"), draw(1, 2, "a"))
    for other in [(2, 2, "a"), (1, 3, "a"), (1, 2, "b")]:
        assert not torch.equal(draw(1, 2, "a"), draw(*other))


@pytest.mark.parametrize("family", ["cogvideox", "ltx_video", "hunyuan_video"])
def test_resolution_shift_defaults_are_the_family_schedulers(family):
    """--flow-resolution-shifting shifts as the family's pipeline samples: mu from its module's calculate_shift
    with its scheduler's config, applied as the scheduler's time_shift; a family whose scheduler has no dynamic
    shifting refuses the flag."""
    import inspect

    from ft.common.errors import UserError
    from ft.pipelines.loading import import_class
    from ft.pipelines.registry import get_spec
    from ft.train.config import TrainConfig

    spec = get_spec(family)
    scheduler = spec.tiny_components()["scheduler"]
    cfg = TrainConfig(model=family, pretrained="x", shards=["s"], output_dir="o", flow_resolution_shifting=True)
    if not scheduler.config.get("use_dynamic_shifting"):
        with pytest.raises(UserError, match="--flow-resolution-shifting.*fixed --flow-shift"):
            SigmaSampler.from_config(cfg, scheduler.config, spec.display_name)
        return
    sampler = SigmaSampler.from_config(cfg, scheduler.config, spec.display_name)
    pipeline_module = inspect.getmodule(import_class(*spec.pipeline_class))
    u = torch.linspace(0.05, 0.95, 7)
    for seq_len in (256, 2688, 6000):  # 2688: 49x512x768 through LTX-Video's VAE (7 x 16 x 24 latents)
        c = scheduler.config
        mu = pipeline_module.calculate_shift(seq_len, c.get("base_image_seq_len", 256),
                                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                             c.get("max_shift", 1.15))
        assert sampler.resolution_mu(seq_len) == pytest.approx(mu)
        torch.testing.assert_close(sampler.shifted(u, seq_len), scheduler.time_shift(mu, 1.0, u))
    if family == "ltx_video":  # LTX-Video's scheduler config, not SD3's 256/4096/0.5/1.15: e^mu 4.7, not 2.5
        assert math.exp(sampler.resolution_mu(2688)) == pytest.approx(4.69, abs=0.01)
    # a flag given overrides the scheduler's value
    assert SigmaSampler.from_config(TrainConfig(model=family, pretrained="x", shards=["s"], output_dir="o",
                                                flow_resolution_shifting=True, flow_max_shift=3.0),
                                    scheduler.config).max_shift == 3.0


def test_shift_knobs_that_would_do_nothing_are_refused_and_finetrainers_ones_left_out():
    """--flow-base-seq-len (and the other resolution knobs) without --flow-resolution-shifting, and --flow-shift
    beside it, trained as if never given; now refused. finetrainers parses them and never applies them, so its
    spellings are left out with a note instead (a carried-over script still runs)."""
    from ft.cli.finetrainers import translate
    from ft.common.errors import UserError
    from ft.train.config import TrainConfig

    base = {"model": "ltx_video", "pretrained": "x", "shards": ["s"], "output_dir": "o"}
    with pytest.raises(UserError, match=r"--flow-base-seq-len, --flow-max-shift: used only with "
                                        r"--flow-resolution-shifting"):
        TrainConfig(**base, flow_base_seq_len=256, flow_max_shift=2.0)
    with pytest.raises(UserError, match=r"--flow-shift 3.0 and --flow-resolution-shifting"):
        TrainConfig(**base, flow_resolution_shifting=True, flow_shift=3.0)
    assert TrainConfig(**base, flow_resolution_shifting=True, flow_base_seq_len=512).flow_base_seq_len == 512
    assert TrainConfig(**base, flow_shift=3.0).flow_shift == 3.0

    from ft.cli.main import command_configs

    model = ["--model_name", "ltx_video", "--pretrained_model_name_or_path", "x", "--output_dir", "o",
             "--precomputation_dir", "s"]
    plain = translate("train", [*model, "--flow_base_seq_len", "256", "--flow_max_shift", "1.15", "--flow_shift",
                                "3"], None, command_configs(), "cli")
    assert "--flow-base-seq-len" not in plain.runs[0] and "--flow-max-shift" not in plain.runs[0]
    assert plain.runs[0][plain.runs[0].index("--flow-shift") + 1] == "3"
    assert any("--flow_base_seq_len 256" in n for n in plain.notes)
    shifting = translate("train", [*model, "--flow_resolution_shifting", "--flow_base_seq_len", "256",
                                   "--flow_shift", "3"], None, command_configs(), "cli")
    assert "--flow-shift" not in shifting.runs[0] and "--flow-base-seq-len" in shifting.runs[0]
    assert any("--flow_shift 3" in n for n in shifting.notes)
