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

Layers that models apply to one input (queries, keys and values; a gated MLP's gate and up projections) go further,
as one :class:`LoraGroupFunction`: the input is read once for all their A matrices in the forward and in the
backward, and their input gradients are summed in place. A member called on anything but the very input the group
was computed from (another tensor, the same one modified in place, another grad mode) is computed alone. Grouped
only in the model types the tests verify (:data:`GROUPED_MODEL_TYPES`). Measured on SmolLM2-135M (LoRA r16 on all
linear layers, 2 CPU threads) on a noisy shared machine: 1.07x faster forward and backward than the layers one by
one in one process alternating (``benchmarks/lora_groups.py``), 1.10x with two processes taking turns.
"""

from __future__ import annotations

import threading
import types
from typing import Any

import torch
from torch.distributed.tensor import DTensor


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


class LoraGroupFunction(torch.autograd.Function):
    """Several LoRA linears applied to one input, with their A matrices as one matmul:
    ``y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T`` for i = 1..n.

    Called as ``apply(x, scalings, W_1..W_n, b_1..b_n, A_1..A_n, B_1..B_n)``. Shapes: x (..., in); W_i (out_i, in);
    b_i (out_i,) or None; A_i (r_i, in); B_i (out_i, r_i); scalings a tuple of n floats; returns the n y_i (..., out_i).

    Against n :class:`LoraLinearFunction` calls it reads x once instead of n times in the forward (one
    ``(T, sum r)`` product for all the A's) and in the backward (one product for all the A gradients), adds the n
    input gradients into one buffer in place (the autograd engine would add n separate ``(T, in)`` tensors), and is
    one autograd node instead of n. The same matmuls otherwise; the result differs only by rounding (a few ulp).
    """

    @staticmethod
    def forward(ctx, x, scalings, *tensors):
        n = len(scalings)
        weights, biases, lora_as, lora_bs = (tensors[i * n : (i + 1) * n] for i in range(4))
        flat = x.reshape(-1, x.shape[-1])
        ranks = [a.shape[0] for a in lora_as]
        lora_a = torch.cat(lora_as)  # (sum r, in)
        low = torch.mm(flat, lora_a.t())  # (T, sum r)
        outs = []
        for weight, bias, lora_b, scaling, part in zip(weights, biases, lora_bs, scalings, low.split(ranks, dim=1)):
            out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
            out.addmm_(part, lora_b.t(), alpha=scaling)
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
        ctx.save_for_backward(flat, low, lora_a, *weights, *lora_bs)
        ctx.scalings, ctx.ranks, ctx.x_shape = scalings, ranks, x.shape
        ctx.has_bias = [bias is not None for bias in biases]
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        n = len(ctx.scalings)
        flat, low, lora_a, *rest = ctx.saved_tensors
        weights, lora_bs = rest[:n], rest[n:]
        need_x = ctx.needs_input_grad[0]
        need_w, need_b, need_a, need_lb = (ctx.needs_input_grad[2 + i * n : 2 + (i + 1) * n] for i in range(4))
        # (T, out_i); None for an output the loss does not use: its layer's parameters get no gradient, as in peft
        grads = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grad_outs]
        used = [g is not None for g in grads]
        if not any(used):
            return (None,) * (2 + 4 * n)
        grad_low = torch.cat([torch.mm(g, lb).mul_(s) if g is not None else low.new_zeros(len(low), r)
                              for g, lb, s, r in zip(grads, lora_bs, ctx.scalings, ctx.ranks)], dim=1)
        grad_x = None
        if need_x:
            for g, weight in zip(grads, weights):
                if g is not None:
                    grad_x = torch.mm(g, weight) if grad_x is None else grad_x.addmm_(g, weight)
            grad_x = grad_x.addmm_(grad_low, lora_a).view(ctx.x_shape)
        grad_ws = [torch.mm(g.t(), flat) if need and g is not None else None for g, need in zip(grads, need_w)]
        grad_bs = [g.sum(0) if need and has and g is not None else None
                   for g, need, has in zip(grads, need_b, ctx.has_bias)]
        grad_as = [None] * n
        if any(need and u for need, u in zip(need_a, used)):
            grad_as = [a if need and u else None
                       for a, need, u in zip(torch.mm(grad_low.t(), flat).split(ctx.ranks), need_a, used)]
        lows = low.split(ctx.ranks, dim=1)
        grad_lbs = [torch.mm(g.t(), part).mul_(s) if need and g is not None else None
                    for g, part, s, need in zip(grads, lows, ctx.scalings, need_lb)]
        return (grad_x, None, *grad_ws, *grad_bs, *grad_as, *grad_lbs)


def _plain_parts(layer: Any, x: torch.Tensor) -> tuple | None:
    """``(weight, bias, lora_a, lora_b, scaling)`` where :class:`LoraLinearFunction` computes exactly what peft's
    ``lora.Linear.forward(x)`` would; None where it does not (then peft's own path runs)."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant:
        return None
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name].weight, layer.lora_B[name].weight
    if layer.lora_B[name].bias is not None:  # peft's lora_bias: B carries a bias this function does not add
        return None
    dropout = layer.lora_dropout[name]
    plain = (
        not isinstance(dropout, torch.nn.Dropout) or dropout.p == 0.0 or not dropout.training
    ) and not torch.is_autocast_enabled(x.device.type)
    tensors = (x, base.weight, lora_a, lora_b) + ((base.bias,) if base.bias is not None else ())
    same = all(t.dtype == x.dtype and t.device == x.device for t in tensors)
    partitioned = any(hasattr(t, "ds_id") or isinstance(t, DTensor) for t in tensors[1:]) or (
        base.weight.shape != (base.out_features, base.in_features))  # ZeRO-3, a sharded FSDP2 weight
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (base, layer.lora_A[name], layer.lora_B[name]))
    if not plain or not same or partitioned or hooked:
        return None
    return base.weight, base.bias, lora_a, lora_b, float(layer.scaling[name])


def _fused_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's ``lora.Linear.forward``, through :class:`LoraLinearFunction` where that computes the same thing."""
    parts = None if args or kwargs else _plain_parts(layer, x)
    if parts is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    return LoraLinearFunction.apply(x, *parts)


def fuse_lora(model: torch.nn.Module, group: bool = True) -> int:
    """Route every peft ``lora.Linear`` in ``model`` that can take it through :class:`LoraLinearFunction` (each call
    still checks the conditions, and falls back to peft's path when one fails), and with ``group``, in the model types
    of :data:`GROUPED_MODEL_TYPES`, group the routed layers that share an input (:func:`group_lora`). Returns how
    many layers were routed."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if isinstance(module, Linear) and _fusable(module):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    if group and getattr(getattr(model, "config", None), "model_type", None) in GROUPED_MODEL_TYPES:
        group_lora(model)
    return count


# Sibling projections that models apply to one input: attention's queries, keys and values; a gated MLP's two inputs.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# The model types whose groups the tests compare with peft (the types packing is verified on that have these layers).
GROUPED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class _Group:
    """LoRA layers of one module that take the same input. The first of them called computes all of them through
    :class:`LoraGroupFunction` and keeps the others' outputs for their own calls on that same input, per thread."""

    def __init__(self, members: list) -> None:
        self.members = members
        # thread id -> (input, its version, grad mode, {member: its output}) of the group's last computation
        self.pending: dict[int, tuple] = {}

    def take(self, layer: Any, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s pending output if it was computed from ``x`` as it is now; else None."""
        state = self.pending.get(threading.get_ident())
        if state is None:
            return None
        source, version, grad_mode, outputs = state
        if layer not in outputs:  # the member that computed them: a new pass, the last one's outputs not taken
            del self.pending[threading.get_ident()]
            return None
        if source is not x or version != _version(x) or grad_mode != torch.is_grad_enabled():
            return None  # another input: this member alone (the others' outputs stay theirs)
        out = outputs.pop(layer)
        if not outputs:
            del self.pending[threading.get_ident()]
        return out

    def awaits(self, layer: Any) -> bool:
        """Whether ``layer``'s output is pending (so a call of it on another input runs it alone)."""
        state = self.pending.get(threading.get_ident())
        return state is not None and layer in state[3]

    def keep(self, x: torch.Tensor, outputs: dict) -> None:
        self.pending[threading.get_ident()] = (x, _version(x), torch.is_grad_enabled(), outputs)


def _version(x: torch.Tensor) -> int | None:
    """How many times ``x`` was modified in place (inference-mode tensors keep no count: None)."""
    return None if x.is_inference() else x._version


def _grouped_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A grouped member's forward: its output from the group's pending outputs, or the whole group computed now.

    A member whose input is not the group's (another tensor, the same one changed in place, another grad mode)
    runs alone; the group stays, so a pass recomputed under gradient checkpointing makes the same calls again."""
    if args or kwargs:
        return _fused_forward(layer, x, *args, **kwargs)
    group = layer.__dict__["_lora_group"]
    taken = group.take(layer, x)
    if taken is not None:
        return taken
    if group.awaits(layer):
        return _fused_forward(layer, x)  # its own output is pending for another input
    parts = [_plain_parts(member, x) for member in group.members]
    if any(part is None for part in parts):
        return _fused_forward(layer, x)
    weights, biases, lora_as, lora_bs, scalings = zip(*parts)
    outs = LoraGroupFunction.apply(x, scalings, *weights, *biases, *lora_as, *lora_bs)
    group.keep(x, {member: out for member, out in zip(group.members, outs) if member is not layer})
    return outs[group.members.index(layer)]


def group_lora(model: torch.nn.Module) -> int:
    """Compute the fused LoRA layers of a module that take one input (:data:`SHARED_INPUT_GROUPS`) as one
    :class:`LoraGroupFunction`. Each call checks that the member gets the very input the group was computed from
    (the same tensor, not modified in place since, in the same grad mode); a member called on anything else is
    computed alone. Outputs a pass did not take (it stopped with an exception, or a member was never called) are
    dropped when the group is computed again; until then they keep that pass's graph alive. Returns how many groups."""
    count = 0
    for module in model.modules():
        children = dict(module.named_children())
        for names in SHARED_INPUT_GROUPS:
            members = [children.get(name) for name in names]
            if not all(getattr(m, "forward", None) is not None and getattr(m.forward, "__func__", None) is _fused_forward
                       for m in members):
                continue
            group = _Group(members)
            for member in members:
                member.__dict__["_lora_group"] = group
                member.forward = types.MethodType(_grouped_forward, member)
            count += 1
    return count
