"""flow.py: Wan's sampling schedule and UniPC / Euler samplers vs the original FlowUniPCMultistepScheduler and diffusers."""

import pytest
import torch

import flow
from oracles import wan_module


def _field(seed: int = 0):
    """A smooth, nonlinear stand-in for the network's velocity: depends on x and t, different per element."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 3, 4, 5, 6, generator=g).unbind(0)
    return lambda x, t: torch.tanh(a * x + b * (t / 1000.0)) + 0.3 * x


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (13, 3.0), (4, 8.0), (1, 5.0)])
def test_schedule_and_unipc_equal_the_original(steps, shift):
    field = _field(steps)
    x_T = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    # the original, driven as wan/text2video.py drives it
    sched = wan_module("utils.fm_solvers_unipc").FlowUniPCMultistepScheduler(
        num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    sched.set_timesteps(steps, device="cpu", shift=shift)
    x, calls = x_T.clone(), []
    for t in sched.timesteps:
        calls.append(int(t))
        x = sched.step(field(x, t).unsqueeze(0), t, x.unsqueeze(0), return_dict=False)[0][0]
    sigmas, timesteps = flow.wan_schedule(steps, shift)
    assert torch.equal(timesteps, sched.timesteps) and torch.equal(sigmas, sched.sigmas)
    ours_calls = []

    def velocity(x, i):
        ours_calls.append(int(timesteps[i]))
        return field(x, timesteps[i])

    ours = flow.sample_unipc(velocity, x_T.clone(), sigmas)  # relative error measured <= 5.7e-7 over these cases
    assert ours_calls == calls
    assert _rel(ours, x) < 1e-5, _rel(ours, x)


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_samplers_equal_diffusers_on_its_schedule(solver):
    """diffusers' UniPCMultistepScheduler with flow sigmas (as WanPipeline configures it) and its flow-matching Euler,
    each on its own schedule, against ours given that schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if solver == "unipc":
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000, solver_order=2, solver_type="bh2", predict_x0=True,
                                        lower_order_final=True, final_sigmas_type="zero")
    else:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    sched.set_timesteps(20 if solver == "unipc" else 12)
    field = _field(3)
    x_T = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(4))
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(field(x, t), t, x, return_dict=False)[0]
    sampler = flow.sample_unipc if solver == "unipc" else flow.sample_euler
    ours = sampler(lambda x, i: field(x, sched.timesteps[i]), x_T.clone(), sched.sigmas.float())
    assert _rel(ours, x) < 1e-5, _rel(ours, x)


def test_samplers_integrate_a_straight_path_exactly():
    """On the flow of a single clean point (v = (x - x0) / s, the exact velocity), every sampler lands on x0: the
    last UniPC step returns the data prediction, Euler is exact on straight paths."""
    x0 = torch.randn(3, 7, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(3, 7, generator=torch.Generator().manual_seed(8))
    sigmas, _ = flow.wan_schedule(10, shift=5.0)
    assert torch.allclose(flow.add_noise(x0, noise, sigmas[:1]), (1 - sigmas[0]) * x0 + sigmas[0] * noise)
    v = lambda x, i: (x - x0) / sigmas[i]  # noqa: E731
    x_T = flow.add_noise(x0, noise, sigmas[:1])
    for sampler in (flow.sample_euler, flow.sample_unipc):
        assert torch.allclose(sampler(v, x_T.clone(), sigmas), x0, atol=1e-5)


def test_shift_moves_sigmas_towards_noise():
    s = torch.linspace(0.05, 0.95, 10, dtype=torch.float64)
    assert torch.equal(flow.shift_sigma(s, 1.0), s)
    assert bool((flow.shift_sigma(s, 5.0) > s).all()) and torch.allclose(flow.shift_sigma(torch.tensor(0.5), 3.0),
                                                                         torch.tensor(0.75))


def test_sample_latents_is_guided_unipc_with_the_network_seeing_integer_timesteps():
    """One batched call per step for both branches gives what the original's two calls and its guidance give."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(4, 4, generator=g)
    seen = []

    def net(x, t, ctx):  # depends on x, t and the context, per sample
        seen.append(t.clone())
        return torch.tanh(torch.einsum("bcfhw,cd->bdfhw", x, w) + ctx.mean((1, 2)).view(-1, 1, 1, 1, 1) + t.view(
            -1, 1, 1, 1, 1) / 1000)

    noise = torch.randn(2, 4, 3, 2, 2, generator=g)
    ctx, unc = torch.randn(2, 5, 3, generator=g), torch.zeros(2, 5, 3)
    out = flow.sample_latents(net, noise, ctx, unc, steps=6, shift=5.0, guidance=4.0)
    sigmas, timesteps = flow.wan_schedule(6, 5.0)
    assert all(bool((s == float(t)).all()) and len(s) == 4 for s, t in zip(seen, timesteps))

    def velocity(x, i):  # the original's form: conditional and unconditional passes apart
        t = timesteps[i].float().expand(2)
        v_c, v_u = net(x, t, ctx), net(x, t, unc)
        return v_u + 4.0 * (v_c - v_u)

    assert torch.allclose(out, flow.sample_unipc(velocity, noise, sigmas), atol=1e-6)
    plain = flow.sample_latents(net, noise, ctx, unc, steps=6, shift=5.0, guidance=1.0)
    assert torch.allclose(plain, flow.sample_unipc(lambda x, i: net(x, timesteps[i].float().expand(2), ctx), noise,
                                                   sigmas), atol=1e-6) and not torch.allclose(plain, out, atol=1e-3)
