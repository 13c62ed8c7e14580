"""The one definition of the language-model loss, below every stage that needs it.

The data loader labels positions that carry no loss with IGNORE_INDEX; the training step,
validation and `lmforge eval` all sum token cross-entropies with `summed_cross_entropy`, so a
perplexity printed by any of them means the same thing.

`fused_linear_cross_entropy` computes the same sum from the final hidden states and the output
weight without ever holding [tokens, vocab] logits or their gradient: tokens are processed in
chunks, and each chunk's loss AND its gradients (w.r.t. the hidden states and the weight) are
computed in the forward, so backward only scales what was kept. At Llama-3's 128,256 vocabulary
that removes the largest activation of a step. On CUDA, Liger-Kernel's Triton implementation
is used when it is installed (`pip install lmforge[liger]`); everywhere else our PyTorch one.

z-loss (train.z_loss, PaLM's stabiliser): coef x logsumexp(logits)^2 per target token, added to
the summed training loss on both paths, so the step's division by the target count makes it a mean
over the loss-masked tokens. Only while gradients are taken: validation reports plain CE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Label of a position that is not a target (padding in padded mode). PyTorch's own default.
IGNORE_INDEX = -100

# Elements of fp32 logits per chunk (~128 MiB): big enough for efficient matmuls, small next to
# the full logits of any real batch (4 x 2048 tokens x 128k vocab = 4 GiB in fp32).
_CHUNK_ELEMENTS = 1 << 25


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of fp32 token cross-entropies over targets that are not IGNORE_INDEX."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def summed_z_loss(logits: torch.Tensor, labels: torch.Tensor, coef: float) -> torch.Tensor:
    """coef x the sum of logsumexp(logits)^2 over targets that are not IGNORE_INDEX (fp32)."""
    lse = torch.logsumexp(logits.float().reshape(-1, logits.size(-1)), dim=-1)
    return coef * (lse.square() * (labels.reshape(-1) != IGNORE_INDEX)).sum()


def _chunk_size(num_tokens: int, vocab: int, chunk_tokens: int | None) -> int:
    if chunk_tokens is None:
        chunk_tokens = max(1, _CHUNK_ELEMENTS // vocab)
    return max(1, min(num_tokens, chunk_tokens))


def _chunk_loss_and_logit_grad(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, need_grad: bool, z_loss: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed CE (+ z-loss) of one chunk and, if asked, d(loss)/d(logits) = softmax - one_hot
    (z-loss: softmax x (1 + 2 coef lse) - one_hot) in the compute dtype, NOT yet zeroed on ignored
    rows (the caller masks the two [n, H]-sized products instead of this [n, V] block)."""
    safe = labels.clamp(min=0).unsqueeze(1)
    valid = labels != IGNORE_INDEX
    if z_loss:
        logp = (hidden @ weight.t()).float()
        lse = torch.logsumexp(logp, dim=-1, keepdim=True)
        logp.sub_(lse)
        loss = -(logp.gather(1, safe).squeeze(1) * valid).sum() + z_loss * (lse.squeeze(1).square() * valid).sum()
    else:
        # log_softmax is one vectorised pass; its output becomes the gradient in place
        logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
        loss = -(logp.gather(1, safe).squeeze(1) * valid).sum()
    if not need_grad:
        return loss, None
    grad = logp.exp_()
    if z_loss:
        grad.mul_(1.0 + 2.0 * z_loss * lse)
    grad.scatter_add_(1, safe, torch.full(safe.shape, -1.0, device=grad.device))
    return loss, grad.to(hidden.dtype)


_chunk_kernel = _chunk_loss_and_logit_grad


def set_loss_compile(enabled: bool) -> None:
    """Run the per-chunk math (matmul, logsumexp, softmax gradient) through torch.compile, which
    fuses the element-wise passes over the [chunk, vocab] block (parallel.compile_mode: model)."""
    global _chunk_kernel
    _chunk_kernel = (
        # dynamic shapes after the first change: padded batches and the last chunk vary in tokens
        torch.compile(_chunk_loss_and_logit_grad) if enabled else _chunk_loss_and_logit_grad
    )


def _chunked_loss(hidden, weight, labels, chunk, need_h=False, need_w=False, z_loss=0.0):
    """(summed loss, d loss / d hidden or None, d loss / d weight or None), one chunk of rows at a
    time so that only a [chunk, vocab] block of logits exists at once."""
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_h else None
    # fp32 accumulator: bf16 sums over many chunks would lose the small contributions
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk]
        y = labels[start : start + chunk]
        loss, grad = _chunk_kernel(h, weight, y, need_h or need_w, z_loss)
        total += loss
        if not (need_h or need_w):
            continue
        valid = (y != IGNORE_INDEX).unsqueeze(1).to(h.dtype)
        if need_h:
            rows = grad_hidden[start : start + chunk]
            torch.mm(grad, weight, out=rows)
            rows.mul_(valid)
        if need_w:
            masked = h * valid
            if grad.dtype == torch.float32:
                grad_weight.addmm_(grad.t(), masked)
            else:
                grad_weight.add_((grad.t() @ masked).float())
    if need_w:
        grad_weight = grad_weight.to(weight.dtype)
    return total, grad_hidden, grad_weight


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, z_loss):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, grad_hidden, grad_weight = _chunked_loss(hidden, weight, labels, chunk, need_h, need_w, z_loss)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.needs = (need_h, need_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        need_h, need_w = ctx.needs
        return (
            grad_hidden * grad_out.to(grad_hidden.dtype) if need_h else None,
            grad_weight * grad_out.to(grad_weight.dtype) if need_w else None,
            None,
            None,
            None,
        )


def _liger_loss():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


_LIGER = None
_LIGER_CHECKED = False


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int | None = None,
    use_liger: bool | None = None,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """`summed_cross_entropy(hidden @ weight.T, labels)` (+ `summed_z_loss(..., z_loss)`) without
    the [tokens, vocab] logits.

    hidden [..., H] (final-normed states), weight [V, H], labels [...] with IGNORE_INDEX.
    Under autocast the matmul runs in the autocast dtype like F.linear would; the softmax and the
    sum are fp32. use_liger: None = Liger on CUDA when installed (never with z_loss); False = always ours.
    """
    global _LIGER, _LIGER_CHECKED
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if use_liger is None:
        use_liger = device_type == "cuda"
    if use_liger and not z_loss:  # Liger's kernel is used without z-loss only; ours computes it
        if not _LIGER_CHECKED:
            _LIGER, _LIGER_CHECKED = _liger_loss(), True
        if _LIGER is not None:
            with torch.autocast(device_type, enabled=False):
                out = _LIGER(weight, hidden, labels)
            return (out[0] if isinstance(out, tuple) else out).float()
    if device_type == "cpu" and not torch.compiler.is_compiling() and not _distributed(hidden, labels):
        # Padded batches: skip the [n, vocab] work of positions without a target. Selecting them
        # needs their count on the host, free on the CPU (an accelerator would have to sync).
        # Not for DTensors: a data-dependent shape there is a collective per micro batch (and
        # torch's fake-tensor dry run cannot propagate it); ignored positions add 0 either way.
        keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        if keep.numel() < labels.numel():
            hidden, labels = hidden.index_select(0, keep), labels.index_select(0, keep)
    chunk = _chunk_size(hidden.shape[0], weight.shape[0], chunk_tokens)
    with torch.autocast(device_type, enabled=False):
        if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
            return _chunked_loss(hidden, weight, labels, chunk, z_loss=z_loss)[0]  # no gradients to keep
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk, z_loss)


def _distributed(*tensors) -> bool:
    return any(hasattr(t, "device_mesh") for t in tensors)


def output_weight_is_tensor_parallel(weight: torch.Tensor) -> bool:
    """True for a DTensor sharded over a "tp" mesh dimension: its logits are vocab-parallel, so the
    fused loss (which needs the whole vocabulary per token) is not used; FSDP shards are fine
    (FSDP's forward hands the model the gathered weight)."""
    mesh = getattr(weight, "device_mesh", None)
    if mesh is None:
        return False
    names = mesh.mesh_dim_names or ()
    return any(
        name == "tp" and placement.is_shard()
        for name, placement in zip(names, weight.placements)
    )


class LanguageModelLoss:
    """The loss of one micro batch, the same object on every training path.

    `loss(model, batch) -> (summed token CE in fp32, MoE aux loss)` for a batch {"input_ids",
    "labels"} plus the optional "doc_ids"/"position_ids" the loader adds for document masking.
    Its two halves are public for a pipeline, whose last stage runs the forward inside the
    schedule: `forward_kwargs(model)` (what that forward must be asked for) and
    `from_output(output, labels)` (the loss from what it returned).

    fused: compute the CE from hidden states with `fused_linear_cross_entropy` unless the output
    weight is tensor-parallel (then the plain logits path, whose gather the TP plan does).
    z_loss: train.z_loss, added to the summed CE while gradients are enabled (training), never
    under no_grad (validation); vocab-sharded logits (parallel.loss_parallel) are refused by config.
    """

    def __init__(self, fused: bool = True, z_loss: float = 0.0):
        self.fused, self.z_loss = fused, z_loss

    def uses_hidden(self, model) -> bool:
        """Whether `model`'s forward should return hidden states (HiddenOutput) for this loss."""
        if not self.fused:
            return False
        weight = _output_weight(model)
        return weight is not None and not output_weight_is_tensor_parallel(weight)

    def forward_kwargs(self, model) -> dict:
        return {"return_hidden": True} if self.uses_hidden(model) else {}

    def from_output(self, output, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed CE [+ z-loss when training], aux) from a ModelOutput (logits) or HiddenOutput
        (hidden, output weight)."""
        z = self.z_loss if torch.is_grad_enabled() else 0.0
        if len(output) == 3:  # HiddenOutput
            hidden, weight, aux = output
            return fused_linear_cross_entropy(hidden, weight, labels, z_loss=z), aux.float()
        logits, aux = output
        ce = summed_cross_entropy(logits, labels)
        return (ce + summed_z_loss(logits, labels, z) if z else ce), aux.float()

    def __call__(self, model, batch: dict, **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        for key in ("doc_ids", "position_ids"):
            if batch.get(key) is not None:
                model_kwargs[key] = batch[key]
        out = model(batch["input_ids"], **self.forward_kwargs(model), **model_kwargs)
        return self.from_output(out, batch["labels"])


def _output_weight(model) -> torch.Tensor | None:
    """The output weight of the outermost module that has one: `model` itself, or the model a
    wrapper (DDP, torch.compile) holds as a submodule; None for a module without one."""
    inner = next((m for m in model.modules() if hasattr(m, "output_weight")), None)
    return None if inner is None else inner.output_weight()
