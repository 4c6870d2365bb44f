"""How much the loss cares about each Linear's output: the weights ``budget_weighting: fisher`` puts on output errors.

A layer-local output error ``‖X Eᵀ‖²`` says how far a Linear's output moved, not what that costs the model: a
layer whose output the rest of the network damps (or amplifies) costs less (more) per unit of error. To second
order, an output perturbation ``δY`` raises the loss by ``½ δYᵀ H δY``; with the empirical Fisher for ``H``
(``E[g gᵀ]``, ``g`` the loss gradient with respect to the output) and only its diagonal's mean kept per Linear
(the error's direction within a layer is whatever the quantizer left, so no direction is favoured), the cost is
``½ s ‖δY‖²`` with ``s = mean(g²)`` over the calibration tokens and the Linear's output channels, the sensitivity
HAWQ-v2 and SqueezeLLM weight by (as a per-layer trace instead of per weight).

One forward and backward per calibration sequence through the float model, before the post-pass touches it
(weights frozen; only activations carry gradients). The loss is the next-token cross-entropy on the calibration
sequences themselves (their own labels: the *empirical* Fisher). Measured on SmolLM2 (``docs/methods/postpass.md``): choosing
each Linear's format from a menu under 4.5 bits per weight, ``fisher`` gives perplexity 37.35 where ``absolute``
gives 42.62 (the uniform format at those bits 42.51); for ranks alone it gains 1–1.6 % over the uniform rank.
"""

from __future__ import annotations

import contextlib

import torch

from qaft.core.logits import token_nll


def output_sensitivity(model: torch.nn.Module, linears: dict[str, torch.nn.Linear], sequences: torch.Tensor, *, bf16: bool = False) -> dict[str, float]:
    """``{name: mean squared gradient of the loss with respect to the Linear's output}`` over ``sequences``
    (``[n, seq_len]`` token ids, one at a time), the mean loss over each sequence's predicted tokens. ``bf16``: the
    forward and backward under bf16 autocast (``postpass.bf16``; ~2× faster where the device has bf16 units): the
    sensitivities only weigh layers against each other, and bf16 moves them by a few percent (tested)."""
    sums = dict.fromkeys(linears, 0.0)
    counts = dict.fromkeys(linears, 0)

    def watch(name: str):
        def forward(module, args, out):
            def backward(grad: torch.Tensor) -> None:
                sums[name] += grad.detach().double().pow(2).sum().item()
                counts[name] += grad.numel()

            if out.requires_grad:
                out.register_hook(backward)

        return forward

    device = next(model.parameters()).device
    frozen = {p: p.requires_grad for p in model.parameters()}
    embed = model.get_input_embeddings()
    with contextlib.ExitStack() as stack:
        for name, lin in linears.items():
            stack.callback(lin.register_forward_hook(watch(name)).remove)
        stack.callback(lambda: [p.requires_grad_(r) for p, r in frozen.items()])
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16))
        model.requires_grad_(False)
        for seq in sequences:
            ids = seq[None].to(device)
            inputs = embed(ids).detach().requires_grad_(True)  # the graph starts here: no weight gradients are kept
            token_nll(model, ids, inputs_embeds=inputs).mean().backward()  # in chunks of positions (core.logits)
    return {name: sums[name] / max(counts[name], 1) for name in linears}
