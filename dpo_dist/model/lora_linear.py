"""LoRA linear layers as one autograd function: fewer passes over the activations than peft's module-by-module path.

peft computes ``base(x) + lora_B(lora_A(x)) * scaling``: besides the three matmuls, a multiply and an add over the
whole ``(tokens, out)`` output in the forward, and in the backward another multiply over ``(tokens, out)`` and an
add over ``(tokens, in)`` to sum the two input gradients. On a CPU those passes are memory-bound and, with the LoRA
matmuls themselves, cost a sizable share of a LoRA step. :class:`LoraLinearFunction` computes the same thing with
the scaling inside the GEMM (``addmm_``'s ``alpha``) and both sums accumulated in place into the GEMM output
(``addmm_``'s ``beta=1``): the same matmuls, none of the extra passes. It saves the same tensors for the backward as
peft's path does (the input and the rank-``r`` activations).

The result equals peft's up to the rounding of where the scaling is applied (a few ulp; the tests compare the two).
Used only where it computes exactly what peft would: one plain ``nn.Linear`` base layer (not 4/8-bit, not a ZeRO-3
partitioned weight), one active vanilla LoRA adapter (no DoRA or other variant), no LoRA dropout, adapters enabled
and not merged, no autocast, and one dtype throughout. Anywhere else the layer runs peft's own ``forward``.
"""

from __future__ import annotations

import types
from typing import Any

import torch


class LoraLinearFunction(torch.autograd.Function):
    """``y = x W^T + b + scaling * (x A^T) B^T``.

    Shapes: x (..., in); weight W (out, in); bias b (out,) or None; lora_a A (r, in); lora_b B (out, r); y (..., out).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
        low = torch.mm(flat, lora_a.t())  # (T, r)
        out.addmm_(low, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, low, weight, lora_a, lora_b)
        ctx.scaling, ctx.has_bias, ctx.x_shape = scaling, bias is not None, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        flat, low, weight, lora_a, lora_b = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])  # (T, out)
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        grad_low = torch.mm(grad, lora_b).mul_(ctx.scaling)  # (T, r)
        grad_x = grad_weight = grad_bias = grad_a = grad_lb = None
        if need_x:
            grad_x = torch.mm(grad, weight).addmm_(grad_low, lora_a).view(ctx.x_shape)
        if need_w:
            grad_weight = torch.mm(grad.t(), flat)
        if need_b and ctx.has_bias:
            grad_bias = grad.sum(0)
        if need_a:
            grad_a = torch.mm(grad_low.t(), flat)
        if need_lb:
            grad_lb = torch.mm(grad.t(), low).mul_(ctx.scaling)
        return grad_x, grad_weight, grad_bias, grad_a, grad_lb, None


def _fusable(layer: Any) -> bool:
    """The parts of the condition that do not change after loading."""
    return (type(layer.base_layer) is torch.nn.Linear and len(layer.lora_A) == 1 and not layer.lora_variant
            and not any(getattr(layer, "use_dora", {}).values()))


def _fused_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's ``lora.Linear.forward``, through :class:`LoraLinearFunction` where that computes the same thing."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return type(layer).forward(layer, x, *args, **kwargs)
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant:
        return type(layer).forward(layer, x, *args, **kwargs)
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name].weight, layer.lora_B[name].weight
    dropout = layer.lora_dropout[name]
    plain = (
        not isinstance(dropout, torch.nn.Dropout) or dropout.p == 0.0 or not dropout.training
    ) and not torch.is_autocast_enabled(x.device.type)
    tensors = (x, base.weight, lora_a, lora_b) + ((base.bias,) if base.bias is not None else ())
    same = all(t.dtype == x.dtype and t.device == x.device for t in tensors)
    partitioned = any(hasattr(t, "ds_id") for t in tensors[1:]) or base.weight.shape != (base.out_features, base.in_features)
    if not plain or not same or partitioned or base._forward_hooks or base._forward_pre_hooks:
        return type(layer).forward(layer, x, *args, **kwargs)
    return LoraLinearFunction.apply(x, base.weight, base.bias, lora_a, lora_b, float(layer.scaling[name]))


def fuse_lora(model: torch.nn.Module) -> int:
    """Route every peft ``lora.Linear`` in ``model`` that can take it through :class:`LoraLinearFunction` (each call
    still checks the conditions, and falls back to peft's path when one fails). Returns how many layers."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if isinstance(module, Linear) and _fusable(module):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
