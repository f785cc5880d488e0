"""The optimizer of a training run and its two memory options, apart from the method:

    --optimizer adamw       torch.optim.AdamW, fp32 m and v: 8 bytes per trained parameter (the official run's)
    --optimizer adamw8bit   bitsandbytes' blockwise 8-bit AdamW (the official code's `use_8bit_adam`): m and v as
                            uint8 codes with one float32 scale per block of 256 values, ~2 bytes per parameter
    --free-grads            each parameter's optimizer step runs inside backward as soon as its gradient is complete,
                            and the gradient is freed at once: the step never holds all gradients (4 B per parameter)

Why bitsandbytes and not torchao's AdamW8bit: bitsandbytes is what the official code uses; since 0.4x it has a CPU
backend, so the same optimizer runs (and is tested) on the CPU here, eagerly; its state is plain uint8/float32 tensors,
which the weights-only checkpoint loader reads as they are. torchao 0.18's AdamW8bit also runs on CPU, but it
torch.compile's its update once per parameter shape (~20 s each on this CPU, with a C++ compiler at run time) and keeps
its state as a tensor subclass that torch.load(weights_only=True) refuses unless allow-listed.

--free-grads is exact: a parameter's gradient is complete once its post-accumulate-grad hook fires, and AdamW (either
kind) updates each parameter from its own gradient and state alone, so stepping it then gives the weights of the usual
step bit for bit. It cannot clip by the global norm (that needs every gradient first), nor unscale fp16 gradients as a
whole, nor wait for DDP's all-reduce: config.check_memory_options refuses those combinations.
"""

import math

import torch


def bitsandbytes():
    """The optional bitsandbytes package, or a one-line error naming the option and the install command."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SystemExit("error: --optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes; it is not in "
                         "requirements.txt, requirements-test.txt has it)") from None
    return bnb


def has_bitsandbytes() -> bool:
    """Whether --optimizer adamw8bit can run here (benchmarks skip its options, and say so, when it cannot)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def make_adamw(kind: str, params, lr: float, weight_decay: float, device: torch.device):
    """AdamW with the official run's betas and eps: torch's (fp32 state; fused on CUDA; on the CPU the multi-tensor
    version, the same bits as torch's default per-tensor loop in fewer calls) or bitsandbytes' 8-bit."""
    if kind == "adamw8bit":
        # tensors under 4096 values keep 32-bit state (bitsandbytes' min_8bit_size): norms and biases, a few % here
        return bitsandbytes().optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                             fused=device.type == "cuda", foreach=device.type != "cuda")


def state_bytes(kind: str, shapes) -> int:
    """Bytes of optimizer state for parameters of these shapes: fp32 m + v (8 B each), or bitsandbytes' 8-bit m + v
    (1 B each + a float32 absmax per 256 values each) for tensors of >= 4096 values, fp32 below. Plus two 256-entry
    float32 code maps per 8-bit tensor, as each tensor's state names them (bitsandbytes shares one pair: <= 2 KB per
    tensor too many, 1.7 MB on the 1.7B model)."""
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if kind == "adamw8bit" and n >= 4096:
            total += 2 * (n + 4 * math.ceil(n / 256) + 4 * 256)
        else:
            total += 8 * n
    return total


class StepInBackward:
    """--free-grads: one optimizer per parameter, stepped from that parameter's post-accumulate-grad hook, its
    gradient freed there. `armed` is False during backward passes that only accumulate (earlier micro-batches or
    aspect buckets of a step): their gradients wait for the step's last backward. state_dict() has the layout of one
    optimizer over all the parameters, so checkpoints are interchangeable with the usual step's."""

    def __init__(self, params: list, make):
        self.params, self.armed = params, False
        self.opts = [make([p]) for p in params]
        self.param_groups = [g for o in self.opts for g in o.param_groups]  # GradScaler and logging look here
        self.norms = [None] * len(params)  # each gradient's norm, for the logged total norm
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params)]

    def _hook(self, i: int):
        def hook(p):
            if self.armed:
                self.norms[i] = torch.linalg.vector_norm(p.grad)
                self.opts[i].step()
                p.grad = None  # the point of the option: this gradient's memory is free before the next one is made
        return hook

    def finish(self) -> torch.Tensor:
        """End of a step: step any parameter whose gradient came only from earlier backward passes (its hook did not
        fire in the last one); the total gradient norm, as clip_grad_norm_ computes it (the norm of the norms)."""
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self.norms[i] = torch.linalg.vector_norm(p.grad)
                self.opts[i].step()
                p.grad = None
        norms = [torch.zeros((), device=p.device) if n is None else n  # None: no gradient (an unused token row)
                 for n, p in zip(self.norms, self.params)]
        total = torch.linalg.vector_norm(torch.stack(norms))
        self.norms = [None] * len(self.params)
        return total

    def remove(self):
        """Take the hooks off the parameters (the usual step again; benchmarks try one option after another)."""
        for h in self.handles:
            h.remove()

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """One optimizer's layout: state by parameter index, one param group holding every index."""
        dicts = [o.state_dict() for o in self.opts]
        state = {i: d["state"][0] for i, d in enumerate(dicts) if 0 in d["state"]}
        group = {**dicts[0]["param_groups"][0], "params": list(range(len(self.params)))}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, sd: dict):
        """Split a one-optimizer state dict (written by either kind of step) over the per-parameter optimizers."""
        group = {k: v for k, v in sd["param_groups"][0].items() if k != "params"}
        for i, o in enumerate(self.opts):
            o.load_state_dict({"state": {0: sd["state"][i]} if i in sd["state"] else {},
                               "param_groups": [{**group, "params": [0]}]})
