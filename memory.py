"""Training memory for the UNet (unet3d.py): layers that compute exactly what torch's own layers compute, with the
same gradients (tests/test_unet3d.py), but keep fewer bytes for backward, and the layer-wise recomputation that
`UNet3D.set_recompute` switches on. A reader of the method can skip this file.

  * `Conv2d`: a frozen 2-D conv keeps no input (only a weight gradient would need it).
  * `GroupNormSiLU`: GroupNorm -> SiLU keeps only its input and recomputes the rest in backward; `recomputed` does
    the same for any element-wise chain (unet3d.GEGLU).
  * `Dropout`: a 1-byte mask on every device (as torch keeps on CUDA), not the CPU's 4-byte float mask.
  * `checkpointed`: one layer's activations recomputed in backward, all of them ("full") or only the element-wise
    work between the matmul / convolution / attention kernels ("selective").
What each saves on the 1.7B model: docs/memory.md; in step time: docs/benchmarks.md.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


class _FrozenConv2dFn(torch.autograd.Function):
    """conv2d whose backward keeps only the weight. torch's conv node also keeps the input, which only the weight
    gradient needs; with the weight frozen (the spatial convs under NewMove) that is a whole activation per conv kept
    for nothing. The input gradient is the same convolution_backward call torch makes (torch.nn.grad.conv2d_input)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        # The (frozen, leaf) weight is held on ctx, not saved: then a checkpointed layer need not re-run this conv's
        # forward just to re-save it (non-reentrant checkpointing stops recomputing once every saved tensor is back).
        ctx.weight, ctx.x_shape, ctx.stride, ctx.padding = weight, x.shape, stride, padding
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        weight = ctx.weight.to(grad_out.dtype)  # under autocast the product ran in the output's dtype
        grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, weight, grad_out, ctx.stride, ctx.padding)
        return grad_x, None, None, None, None  # autograd casts grad_x to x's dtype


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and key names) that saves no input for backward while its parameters are frozen."""

    def forward(self, x):
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if not (frozen and x.requires_grad and torch.is_grad_enabled()):
            return super().forward(x)
        return _FrozenConv2dFn.apply(x, self.weight, self.bias, self.stride, self.padding)


class _Recomputed(torch.autograd.Function):
    """y = fn(*tensors) that keeps only its inputs for backward and re-runs fn under autograd there.

    For element-wise chains whose intermediates would otherwise each be kept: GroupNorm -> SiLU keeps the norm's input
    AND output, GEGLU keeps the gate AND gelu(gate). Recomputing them costs one cheap element-wise pass in backward and
    gives the very same gradients (same ops, same order). Autocast is replayed as it was in forward."""

    @staticmethod
    def forward(ctx, fn, *tensors):
        ctx.fn, ctx.device = fn, tensors[0].device.type
        ctx.autocast = ((torch.is_autocast_enabled(ctx.device), torch.get_autocast_dtype(ctx.device))
                        if torch.amp.is_autocast_available(ctx.device) else (False, None))  # e.g. the meta device
        ctx.save_for_backward(*tensors)
        return fn(*tensors)

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), (torch.autocast(ctx.device, dtype=dtype) if enabled else contextlib.nullcontext()):
            out = ctx.fn(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (None, *(next(grads) if t.requires_grad else None for t in inputs))


def recomputed(fn, *tensors, enabled: bool = True):
    """fn(*tensors), keeping only `tensors` for backward when autograd records it (see _Recomputed); enabled=False:
    plain autograd, which keeps fn's intermediates (fewer ops, more memory)."""
    if enabled and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _Recomputed.apply(fn, *tensors)
    return fn(*tensors)


class GroupNormSiLU(nn.GroupNorm):
    """silu(group_norm(x)): nn.GroupNorm's parameters and key names; in training only x is kept for backward
    (unless `recompute` is False, UNet3D.set_recompute)."""

    recompute = True

    def forward(self, x):
        return recomputed(self._fn, x, self.weight, self.bias, enabled=self.recompute)

    def _fn(self, x, w, b):
        return F.silu(F.group_norm(x, self.num_groups, w, b, self.eps))


class Dropout(nn.Dropout):
    """nn.Dropout that keeps a 1-byte mask for backward on every device: torch's fused dropout (native_dropout, a bool
    mask), which F.dropout already runs on CUDA; on the CPU F.dropout multiplies by a float mask and keeps that, 4 bytes
    per element. Same random stream as F.dropout for the same seed."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return torch.native_dropout(x, self.p, True)[0]


# Selective recomputation: keep what the matmuls, convolutions and attention kernels produced (the expensive part of a
# layer) and recompute the cheap element-wise work on top of them in backward (GroupNorm, SiLU, GELU, LayerNorm,
# dropout, adds, layout copies), whose saved inputs are most of a UNet's activation memory.
_EXPENSIVE = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              torch.ops.aten.convolution.default, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
              torch.ops.aten._scaled_dot_product_flash_attention.default,
              torch.ops.aten._scaled_dot_product_efficient_attention.default,
              torch.ops.aten._scaled_dot_product_cudnn_attention.default}


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _EXPENSIVE else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_kernel_outputs():
    return create_selective_checkpoint_contexts(_policy)


CHECKPOINTING = ("none", "full", "selective")  # UNet3D.set_recompute's modes, train.py --checkpointing


def checkpointed(fn, *args, mode: str = "none"):
    """fn(*args), recomputing its activations in backward when autograd records it: all of them (mode "full") or only
    the element-wise work ("selective"); mode "none" keeps them."""
    if mode == "none" or not torch.is_grad_enabled():
        return fn(*args)
    if mode == "selective":
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_keep_kernel_outputs)
    return checkpoint(fn, *args, use_reentrant=False)
