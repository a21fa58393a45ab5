"""Start converted sites from the weights they replace: ``convert --init svd`` (paper 3.1).

An initialiser is registered in ``registry.INITIALIZERS`` under its name and called as
``init(conv, new)`` for every standard conv the surgery replaces (``new`` is the ``BSConvU`` or
``BSConvS`` built for it, the conv's bias already copied). It returns ``None`` or a dict of report
extras merged into the site's record. An initialiser may also have a method
``dsc(dw, between, pw, new_pw, new_dw, after=None)`` for reordered depthwise-separable pairs
(``passes/dsc.py``); plain callables do not, and those pairs then start fresh.

``svd`` (all in float64, then cast to the weight dtype):

- **standard conv -> BSConv-U.** Each filter ``F(n)`` is an ``M x K^2`` matrix; its top singular
  pair ``sigma_1 u v^T`` is its least-squares best rank-1 approximation, i.e. the best BSConv-U
  filter (Eckart-Young). The weights ``w[n, :] = sqrt(sigma_1) u`` and the blueprint
  ``B(n) = sqrt(sigma_1) v`` split the filter's norm evenly between the two steps. Kept:
  ``energy_kept = sum_n sigma_1(n)^2 / sum_n ||F(n)||^2`` (Frobenius, the whole conv).
- **standard conv -> BSConv-S.** First the rank-1 step above with unit blueprints ``v(n)``, so
  ``W (N x M)`` has rows ``sigma_1(n) u(n)``. The rank-1 residual of a filter is orthogonal to
  every ``x v(n)^T``, so with these blueprints fixed the filter error is exactly ``||W - W'||_F^2``
  plus the rank-1 residual, and the best ``W' = W_A W_B`` of rank ``M'`` is the truncated SVD
  ``W = U S V^T``: ``W_B = V^T[:M']`` (orthonormal rows, so ``L_ortho = 0`` at the start) and
  ``W_A = U[:, :M'] S[:M']``. Each row of ``W_A`` then shares its norm evenly with its blueprint.
  Kept: ``energy_kept_rank1`` (the rank-1 step) and ``energy_kept`` (after the subspace step; equal
  when ``M' >= rank W``).
- **depthwise-separable pair -> BSConv-U** (reordered by ``passes/dsc.py``). The old pair
  ``dw (D[m], bias b_d) -> between -> pw (P, bias b_p)`` is, with every module between them
  linear, one conv with filters ``F[n, m] = P[n, m] s[m] D[m]`` plus a constant ``k = P (s b_d + t)
  + b_p``, where ``x -> s x + t`` is the eval-mode BatchNorm(s) between them folded together.
  Its BSConv-U start is the per-filter rank-1 SVD of that kernel, as above. The activation between
  them is dropped by the reorder, so here it is **linearised as the identity**: the start is the
  old pair with that activation replaced by the identity, so it matches the old pair (up to the
  rank-1 truncation) only where the activation acts as the identity (no activation, ReLU on
  positive inputs). Norms other than BatchNorm with running statistics (GroupNorm, LayerNorm2d,
  ...) depend on the input and are treated as the identity too. The record names the modules
  ``folded``, ``linearised`` and ``treated_as_identity``, and says whether the start is exact up to
  the rank-1 truncation (``fold_exact``). The constant ``k`` goes into the new
  depthwise's bias when it has one (the old pointwise had a bias), else into the running mean of a
  BatchNorm that alone reads the old pointwise (exact in eval; a train-mode BatchNorm removes
  per-channel constants anyway), else it is dropped and ``constant_dropped`` gives its norm.
- ``with_bn``: a BatchNorm inside BSConv starts as the identity in eval mode: weight 1, bias 0,
  running mean 0 and running variance ``1 - eps`` (so ``sqrt(var + eps) = 1`` exactly; with
  variance 1 every such BN would scale by ``1/sqrt(1 + eps)``). In train mode it normalises with
  batch statistics, as any BatchNorm does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..fx.graph import activation_of, layer_role
from ..fx.modules import batchnorm_affine
from ..layers import BSConvS, BSConvU
from ..core.registry import INITIALIZERS

__all__ = ["Rank1", "filter_rank1", "SVDInit", "identity_batchnorm_", "fold_between"]


@dataclass
class Rank1:
    """Per-filter rank-1 factors of a ``(N, M, kh, kw)`` kernel (float64).

    ``u (N, M)`` and ``v (N, kh*kw)`` are unit singular vectors, ``sigma (N)`` the top singular
    values and ``energy (N)`` each filter's squared Frobenius norm.
    """

    u: torch.Tensor
    v: torch.Tensor
    sigma: torch.Tensor
    energy: torch.Tensor

    @property
    def energy_kept(self) -> float:
        """``sum sigma_1^2 / sum ||F||^2`` over all filters (1.0 for an all-zero kernel)."""
        total = float(self.energy.sum())
        return float(self.sigma.square().sum()) / total if total > 0 else 1.0

    @property
    def filter_energy_kept(self) -> torch.Tensor:
        """The same share for each filter on its own (1.0 for an all-zero filter)."""
        kept = self.sigma.square()
        return torch.where(self.energy > 0, kept / self.energy.clamp_min(1e-300), torch.ones_like(kept))


def filter_rank1(weight: torch.Tensor) -> Rank1:
    """Best rank-1 approximation of every filter of a ``(N, M, kh, kw)`` kernel (batched SVD)."""
    n, m = weight.shape[:2]
    a = weight.detach().to(torch.float64).reshape(n, m, -1)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return Rank1(u[:, :, 0], vh[:, 0, :], s[:, 0], a.square().sum((1, 2)))


def identity_batchnorm_(bn: nn.Module) -> None:
    """Make a BatchNorm the identity in eval mode (see the module docstring)."""
    with torch.no_grad():
        if getattr(bn, "affine", False):
            bn.weight.fill_(1.0)
            bn.bias.zero_()
        if getattr(bn, "track_running_stats", False):
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn.num_batches_tracked.zero_()


def _shaped(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Factors (``(N, M)`` weights, ``(N, kh*kw)`` blueprints) as the conv weight ``like``."""
    return t.reshape(like.shape).to(like.dtype)


def _balanced(r: Rank1) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(w, B)`` with ``w[n] = sqrt(sigma) u[n]`` and ``B[n] = sqrt(sigma) v[n]``."""
    root = r.sigma.sqrt()[:, None]
    return r.u * root, r.v * root


def _init_u(r: Rank1, new: BSConvU) -> Dict[str, float]:
    w, b = _balanced(r)
    with torch.no_grad():
        new.pw.weight.copy_(_shaped(w, new.pw.weight))
        new.dw.weight.copy_(_shaped(b, new.dw.weight))
    if hasattr(new, "bn"):
        identity_batchnorm_(new.bn)
    return _energy_extras(r)


def _energy_extras(r: Rank1) -> Dict[str, float]:
    return {
        "init": "svd",
        "energy_kept": r.energy_kept,
        "energy_kept_min_filter": float(r.filter_energy_kept.min()),
    }


def _init_s(r: Rank1, new: BSConvS) -> Dict[str, float]:
    mid = new.mid_channels
    w = r.u * r.sigma[:, None]  # W (N x M): rows sigma_1 u, blueprints are the unit v
    u, s, vh = torch.linalg.svd(w, full_matrices=True)  # vh: M x M, so W_B always has M' rows
    k = min(mid, s.numel())
    w_a = torch.zeros(w.shape[0], mid, dtype=w.dtype, device=w.device)
    w_a[:, :k] = u[:, :k] * s[:k]
    w_b = vh[:mid]
    # balance each W_A row with its blueprint: both carry sqrt(||W_A[n]||)
    row = w_a.norm(dim=1)
    scale = torch.where(row > 0, row.sqrt(), torch.ones_like(row))
    blueprints = r.v * scale[:, None]
    w_a = w_a / scale[:, None]
    with torch.no_grad():
        new.pw1.weight.copy_(_shaped(w_b, new.pw1.weight))
        new.pw2.weight.copy_(_shaped(w_a, new.pw2.weight))
        new.dw.weight.copy_(_shaped(blueprints, new.dw.weight))
    for name in ("bn1", "bn2"):
        if hasattr(new, name):
            identity_batchnorm_(getattr(new, name))
    total = float(r.energy.sum())
    kept = float(s[:k].square().sum()) / total if total > 0 else 1.0
    return {
        "init": "svd",
        "energy_kept_rank1": r.energy_kept,
        "energy_kept": kept,
        "subspace_rank": k,
    }


# ---------------------------------------------------------------------------------------------
# depthwise-separable pairs
# ---------------------------------------------------------------------------------------------


def _foldable_norm(module: Optional[nn.Module]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(s, t)`` of a norm with running statistics (``batchnorm_affine``), else ``None``."""
    return batchnorm_affine(module) if layer_role(module) == "norm" else None


def fold_between(between: Sequence[Tuple[str, nn.Module]], channels: int,
                 device=None) -> Tuple[torch.Tensor, torch.Tensor, dict]:
    """Fold the modules between a depthwise and a pointwise conv into ``x -> s x + t``.

    BatchNorms (with running statistics) fold exactly in eval mode; activations, including the
    one fused into timm's ``BatchNormAct2d``, are linearised as the identity; other norms are
    treated as the identity. Returns ``(s, t, notes)``.
    """
    s = torch.ones(channels, dtype=torch.float64, device=device)
    t = torch.zeros(channels, dtype=torch.float64, device=device)
    notes: Dict[str, List[str]] = {"folded": [], "linearised": [], "treated_as_identity": []}
    for name, module in between:
        affine = _foldable_norm(module)
        if affine is not None:
            s, t = affine[0] * s, affine[0] * t + affine[1]
            notes["folded"].append(name)
        elif layer_role(module) == "norm":  # a norm that depends on the input: not foldable
            notes["treated_as_identity"].append(name)
        act = activation_of(module)
        if act is not None:
            notes["linearised"].append(f"{name} ({act})")
    return s, t, notes


class SVDInit:
    """The ``svd`` initialiser (see the module docstring)."""

    def __call__(self, conv: nn.Conv2d, new: nn.Module) -> Optional[dict]:
        r = filter_rank1(conv.weight)
        if isinstance(new, BSConvS):
            return _init_s(r, new)
        if isinstance(new, BSConvU):
            return _init_u(r, new)
        return None

    def dsc(self, dw: nn.Conv2d, between: Sequence[Tuple[str, nn.Module]], pw: nn.Conv2d,
            new_pw: nn.Conv2d, new_dw: nn.Conv2d, after: Optional[nn.Module] = None) -> dict:
        """Initialise a reordered pair: ``new_pw`` (M -> N) and ``new_dw`` (KxK on N).

        ``after`` is a BatchNorm that alone reads the old pointwise, if any: it takes the constant
        term when ``new_dw`` has no bias.
        """
        m = dw.in_channels
        s, t, notes = fold_between(between, m, dw.weight.device)
        d = dw.weight.detach().to(torch.float64).reshape(m, -1)  # D[m] (K^2)
        p = pw.weight.detach().to(torch.float64).reshape(pw.out_channels, m)  # P[n, m]
        kernel = (p * s)[:, :, None] * d[None]  # F[n, m] = P[n, m] s[m] D[m]
        r = filter_rank1(kernel)
        w, b = _balanced(r)
        dw_bias = dw.bias.detach().to(torch.float64) if dw.bias is not None else torch.zeros_like(s)
        const = p @ (s * dw_bias + t)
        if pw.bias is not None:
            const = const + pw.bias.detach().to(torch.float64)
        with torch.no_grad():
            new_pw.weight.copy_(_shaped(w, new_pw.weight))
            new_dw.weight.copy_(_shaped(b, new_dw.weight))
            if new_dw.bias is not None:
                new_dw.bias.copy_(const.to(new_dw.bias.dtype))
                where = "the new depthwise's bias"
            elif not bool(const.any()):
                where = "none (zero)"
            elif _foldable_norm(after) is not None:  # a BatchNorm with running statistics
                after.running_mean.sub_(const.to(after.running_mean.dtype))
                where = "the running mean of the BatchNorm after the pointwise"
            else:
                where = "dropped"
        extras = {**_energy_extras(r), **{k: v for k, v in notes.items() if v}, "constant": where}
        if where == "dropped":
            extras["constant_dropped"] = float(const.norm())
        extras["fold_exact"] = not notes["linearised"] and not notes["treated_as_identity"] and where != "dropped"
        return extras


INITIALIZERS.register("default", None)  # fresh weights, as the reference implementation
INITIALIZERS.register("svd", SVDInit())
#: ``auto`` is resolved by ``convert()``: ``svd`` when the source model has trained weights (a
#: checkpoint or published weights were loaded), ``default`` otherwise; reports and
#: ``surgery.json`` hold the resolved name.
INITIALIZERS.register("auto", None)
