"""Muon for the hidden matrices, AdamW for everything else, as ONE torch optimizer.

Muon (Jordan et al. 2024; Moonlight, Liu et al. 2025) per matrix parameter W with gradient G:

    B <- mu * B + (1 - mu) * G                       momentum (an EMA, as torch.optim.Muon keeps it)
    U <- (1 - mu) * G + mu * B   if nesterov else B
    O <- NS_k(U)                                     k quintic Newton-Schulz steps on U / ||U||_F,
                                                     X <- a X + (b A + c A^2) X with A = X X^T,
                                                     (a, b, c) = (3.4445, -4.7750, 2.0315)
    W <- W * (1 - lr * wd) - lr * s(W) * O           s: the lr adjustment rule for a [rows, cols]
                                                     matrix: original sqrt(max(1, rows/cols)),
                                                     match_rms_adamw 0.2*sqrt(max(rows, cols)), none 1

These are torch.optim.Muon's equations (torch >= 2.9) with three extensions it lacks: tensors of
more than two dimensions are stacks of matrices, each orthogonalised on its own (MoE experts
stored as [E, out, in]); DTensor parameters (FSDP2 Shard(0), tensor-parallel row/column shards,
both) are gathered whole for the Newton-Schulz step and the local shard of the result is kept,
so every layout computes exactly what one process computes; and the Newton-Schulz dtype is a
choice (float32 by default: the CPU has no fast bfloat16 matmul, and it makes the update
reproducible to 1e-6; torch's is bfloat16). On torch without torch.optim.Muon nothing changes.

`MuonAdamW` holds a torch.optim.AdamW for the other groups (embeddings, output, norms, biases,
routers) and a `Muon` for the matrices; both share this object's param_groups and state, so the
LR scheduler, the grad scaler, the checkpointer (DCP) and resume see one optimizer.
Communication: one all-gather of each sharded matrix's update per step (counted in comm_bytes).
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_RULES = ("original", "match_rms_adamw", "none")


def newton_schulz(
    update: torch.Tensor, steps: int, eps: float = 1e-7, dtype: str = "float32"
) -> torch.Tensor:
    """Approximate orthogonalisation of each matrix in the last two dims (a stack is batched)."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(getattr(torch, dtype))
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.transpose(-2, -1)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.transpose(-2, -1)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    if tall:
        x = x.transpose(-2, -1)
    return x.to(update.dtype)


def adjusted_lr(lr: float, rule: str, shape) -> float:
    rows, cols = shape[-2], shape[-1]
    if rule == "original":
        return lr * max(1.0, rows / cols) ** 0.5
    if rule == "match_rms_adamw":
        return lr * 0.2 * max(rows, cols) ** 0.5
    return lr


def _closure_loss(closure):
    """The loss a torch optimizer's step(closure) returns: the closure re-run with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


class Muon(Optimizer):
    """Muon over 2-D (and stacked N-D) parameters, plain or DTensor. Group keys: `DEFAULTS`."""

    # Each group's hyperparameters and their defaults (what torch.optim.Muon takes, plus ns_dtype).
    DEFAULTS = {
        "lr": 0.02,
        "momentum": 0.95,
        "nesterov": True,
        "ns_steps": 5,
        "adjust_lr": "match_rms_adamw",
        "weight_decay": 0.1,
        "eps": 1e-7,
        "ns_dtype": "float32",
    }

    def __init__(self, params, **hyperparameters):
        unknown = sorted(set(hyperparameters) - set(self.DEFAULTS))
        if unknown:
            raise TypeError(f"Muon got unknown hyperparameters {unknown}; it takes {sorted(self.DEFAULTS)}")
        defaults = {**self.DEFAULTS, **hyperparameters}
        if defaults["adjust_lr"] not in ADJUST_LR_RULES:
            raise ValueError(f"adjust_lr must be one of {ADJUST_LR_RULES}")
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon takes matrices; got a parameter of shape {tuple(p.shape)}")
        self.comm_bytes = 0  # bytes this rank received to gather whole matrices, since construction

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                update = self._orthogonalise(update, group)
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr"], p.shape))
        return loss

    def _orthogonalise(self, update: torch.Tensor, group: dict) -> torch.Tensor:
        steps, eps, dtype = group["ns_steps"], group["eps"], group["ns_dtype"]
        if not _is_dtensor(update):
            return newton_schulz(update, steps, eps, dtype)
        from torch.distributed.tensor import DTensor, Replicate

        local = update.to_local()
        full = update.full_tensor()  # the whole matrix on every rank (all-gather over its shards)
        self.comm_bytes += (full.numel() - local.numel()) * full.element_size()
        ortho = newton_schulz(full, steps, eps, dtype)
        # Replicate -> the parameter's placements only slices this rank's shard: no communication.
        mesh = update.device_mesh
        replicated = DTensor.from_local(ortho, mesh, [Replicate()] * mesh.ndim, run_check=False)
        return replicated.redistribute(mesh, update.placements)


class MuonAdamW(Optimizer):
    """One optimizer: groups marked {"muon": True} step with Muon, the others with AdamW.

    The inner optimizers hold the SAME group dicts and state dict as this one, so
    state_dict()/load_state_dict(), DCP's get_state_dict, the LR schedule and GradScaler all work on
    this object as on any torch optimizer."""

    def __init__(
        self, muon_groups: list[dict], adamw_groups: list[dict], muon_defaults: dict, adamw_kwargs: dict
    ):
        for g in muon_groups:
            g["muon"] = True
        for g in adamw_groups:
            g["muon"] = False
        self._adamw = torch.optim.AdamW(adamw_groups, **adamw_kwargs) if adamw_groups else None
        self._muon = Muon(muon_groups, **muon_defaults) if muon_groups else None
        # Optimizer.__init__ keeps the group dicts it is given (the inner ones, already filled in).
        inner = (self._adamw.param_groups if self._adamw else []) + (
            self._muon.param_groups if self._muon else []
        )
        super().__init__(inner, {})
        self._relink()

    def _relink(self) -> None:
        """Point the inner optimizers at this one's groups and state (again after load_state_dict,
        which replaces both)."""
        if self._adamw is not None:
            self._adamw.param_groups = [g for g in self.param_groups if not g["muon"]]
            self._adamw.state = self.state
        if self._muon is not None:
            self._muon.param_groups = [g for g in self.param_groups if g["muon"]]
            self._muon.state = self.state

    @property
    def comm_bytes(self) -> int:
        return self._muon.comm_bytes if self._muon is not None else 0

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._relink()

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        if self._adamw is not None:
            self._adamw.step()
        if self._muon is not None:
            self._muon.step()
        return loss
