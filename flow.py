"""Flow matching as Wan 2.1 uses it: the noise path, the shifted sigma schedule and the samplers, as small pure functions.

Wan (arXiv 2503.20314 §3.1) is trained with rectified flow: a clean latent x0 and Gaussian noise n are joined by the
straight path x_s = (1 - s) x0 + s n, s in [0, 1], and the network predicts the velocity v = dx_s/ds = n - x0 from
(x_s, t = 1000 s). Sampling integrates that ODE from s = 1 to s = 0. Two facts of the released sampler matter for
equal numbers and are kept here:
  * the schedule: sigmas evenly spaced from 0.999 (the float32 value of the training schedule's first sigma) down to 0,
    `steps` of them, each bent by the time shift s' = shift s / (1 + (shift - 1) s) (SD3, Esser et al. 2024, eq. 23),
    which spends more steps at high noise; the network is called with t = int(1000 s'), truncated as an int64 tensor;
  * the solver: UniPC (Zhao et al. 2023, arXiv 2302.04867) in its "bh2" variant on the data prediction
    x0 = x_s - s v, order 2 with warm-up, a corrector after every model call but the first, first order on the last
    step (which therefore returns the last x0 prediction exactly).
An Euler sampler is given beside it: one line per step, the definition the others approximate.

Sources: the original `wan/utils/fm_solvers_unipc.py` (FlowUniPCMultistepScheduler) and `wan/text2video.py` (how it is
driven: constructed with shift 1, `set_timesteps(steps, shift=shift)`, defaults 50 steps, shift 5.0, guidance 5.0);
diffusers `schedulers/scheduling_unipc_multistep.py` (use_flow_sigmas) and `scheduling_flow_match_euler_discrete.py`.
tests/test_flow.py proves the sampler equal to both.
"""

import torch

NUM_TRAIN_TIMESTEPS = 1000
# The first sigma of the training schedule 1 - linspace(1, 1/1000, 1000)[::-1] as a float32, as the original reads it.
SIGMA_MAX = float(torch.tensor(1 - 1 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32))


def shift_sigma(s, shift: float):
    """The time shift s -> shift s / (1 + (shift - 1) s): shift > 1 moves every s towards 1 (more noise)."""
    return shift * s / (1 + (shift - 1) * s)


def wan_schedule(steps: int, shift: float = 5.0):
    """The released sampling schedule: (sigmas (steps + 1,) float32 ending in 0, timesteps (steps,) int64 = the t
    the network is called with)."""
    s = shift_sigma(torch.linspace(SIGMA_MAX, 0.0, steps + 1, dtype=torch.float64)[:-1], shift)
    timesteps = (s * NUM_TRAIN_TIMESTEPS).to(torch.int64)  # truncation, as numpy's astype in the original
    return torch.cat([s, s.new_zeros(1)]).float(), timesteps


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x0 + s n, sigma broadcast over the trailing dims of x0."""
    sigma = sigma.reshape(-1, *[1] * (x0.ndim - 1))
    return (1 - sigma) * x0 + sigma * noise


# -----------------------------------------------------------------------------------------------------------------------
# samplers: `velocity(x, i)` is the (guided) network output at step i, sigma = sigmas[i]; x starts as pure noise


@torch.no_grad()
def sample_euler(velocity, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Euler on dx/ds = v: x <- x + (s_{i+1} - s_i) v."""
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, i)
    return x


def _lambda(sigmas: torch.Tensor) -> torch.Tensor:
    """Half log-SNR of the flow path, log((1 - s) / s); +inf at s = 0."""
    return torch.log(1 - sigmas) - torch.log(sigmas)


@torch.no_grad()
def sample_unipc(velocity, x: torch.Tensor, sigmas: torch.Tensor, order: int = 2) -> torch.Tensor:
    """UniPC-bh2 with data prediction (predict_x0), solver_order `order` (1 or 2), as Wan's FlowUniPCMultistepScheduler.

    Per step i: x0_i = x - s_i v; correct the previous prediction of x with x0_i (UniC, not at i = 0); predict the next
    x from x0_i and x0_{i-1} (UniP). The order warms up (1 at the first step) and falls to 1 on the last step.
    """
    assert order in (1, 2), "Wan samples with solver_order 2; orders above 2 are not implemented"
    lam = _lambda(sigmas.double())
    n = len(sigmas) - 1
    x0s, x_prev, prev_order = [], None, 1
    for i in range(n):
        x0 = x - sigmas[i] * velocity(x, i)
        if i > 0:  # UniC: redo the last step (i-1 -> i) with the new data prediction as one more node
            x = _unic(x_prev, x0s, x0, lam, sigmas, i, prev_order)
        x0s = (x0s + [x0])[-order:]
        p = min(order, n - i, len(x0s))  # warm-up; lower_order_final
        x_prev, x = x, _unip(x, x0s, lam, sigmas, i, p)
        prev_order = p
    return x


def _unip(x, x0s, lam, sigmas, i: int, p: int):
    """Predictor from s_i to s_{i+1} of order p; x0s[-1] is x0_i, x0s[-2] is x0_{i-1}."""
    h = lam[i + 1] - lam[i]
    phi = torch.expm1(-h)  # e^{-h} - 1; bh2 takes B(h) = this too
    m0 = x0s[-1]
    if p == 2:  # the multistep term: a divided difference of the last two data predictions, weight 1/2
        r1 = (lam[i - 1] - lam[i]) / h
        m0 = m0 + 0.5 * (x0s[-2] - x0s[-1]) / r1.float()
    alpha = 1 - sigmas[i + 1]
    return sigmas[i + 1] / sigmas[i] * x - alpha * phi.float() * m0


def _unic(x, x0s, x0_new, lam, sigmas, i: int, c: int):
    """Corrector of the step s_{i-1} -> s_i (taken from x) of order c, using x0_new = the prediction at the new point."""
    h = lam[i] - lam[i - 1]
    hh = -h
    phi = torch.expm1(hh)
    m0 = x0s[-1]  # x0_{i-1}
    d_new = x0_new - m0
    if c == 1:
        corr = 0.5 * d_new  # the order-1 corrector is the trapezoid rule
    else:  # solve the 2x2 order conditions [[1, 1], [r1, 1]] rho = b (R and b of UniPC's Algorithm, B(h) = phi)
        r1 = (lam[i - 2] - lam[i - 1]) / h
        b1 = (phi / hh - 1) / phi
        b2 = 2 * ((phi / hh - 1) / hh - 0.5) / phi
        rho0 = (b1 - b2) / (1 - r1)
        rho1 = b1 - rho0
        corr = rho0.float() * (x0s[-2] - m0) / r1.float() + rho1.float() * d_new
    alpha = 1 - sigmas[i]
    return sigmas[i] / sigmas[i - 1] * x - alpha * phi.float() * (m0 + corr)


@torch.no_grad()
def sample_latents(net, noise, context, uncond, steps: int = 50, shift: float = 5.0, guidance: float = 5.0,
                   solver: str = "unipc", schedule: tuple | None = None) -> torch.Tensor:
    """Wan's denoising loop on latents: `net(x, t, context)` -> velocity, guided as v_u + g (v_c - v_u) (the original
    runs the conditional and unconditional passes separately; here they share one batch: the same numbers), from
    `noise` (B, C, F, h, w) through `steps` steps of the shifted schedule. context, uncond: (B, L, D). `schedule`:
    another (sigmas, timesteps) pair, e.g. diffusers' (its flow UniPC spaces sigmas from 1, not 0.999)."""
    sigmas, timesteps = schedule or wan_schedule(steps, shift)
    sigmas = sigmas.to(noise.device)
    timesteps = timesteps.to(noise.device)
    both = torch.cat([context, uncond]) if guidance != 1 else context  # (2B, L, D)

    def velocity(x, i):
        t = timesteps[i].float().expand(len(both))  # the network sees the truncated integer t
        v = net(torch.cat([x, x]) if guidance != 1 else x, t, both).float()
        if guidance == 1:
            return v
        v_c, v_u = v.chunk(2)
        return v_u + guidance * (v_c - v_u)

    sampler = sample_unipc if solver == "unipc" else sample_euler
    return sampler(velocity, noise.float(), sigmas)
