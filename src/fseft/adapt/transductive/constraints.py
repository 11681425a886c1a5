"""Penalties that keep a predicted structure proportion inside a band around its size prior.

Both penalties enforce the same pair of inequality constraints on the ratio ``r = p_hat / p_prior``
of the predicted proportion to the prior (relative units, so a small organ and a large one are
penalised alike)::

    z_over  = r - (1 + m) <= 0      (p_hat <= (1 + m) p_prior: no over-segmentation)
    z_under = (1 - m) - r <= 0      (p_hat >= (1 - m) p_prior: no under-segmentation)

``"hinge"`` (the paper's penalty, made symmetric)::

    lam * (relu(z_over)^2 + relu(z_under)^2) = lam * relu(|p_hat - p_prior| / p_prior - m)^2

It is exactly zero inside the band (so an optimiser step can be skipped and the model is left
untouched), continuous with a continuous gradient at the band edges, and its gradient grows with the
violation. Squared rather than linear: with a linear hinge every violation, however small, gets a
full-size push that overshoots and oscillates across the edge; the squared one slows down as it
approaches the band.

Why symmetric. The reference implementation (``fseft/transductive/TI_modules.py`` of
jusiro/fewshot-finetuning) computes ``e = (p_prior - p_hat) / max(p_hat, p_prior)`` and penalises
``|e| - m`` when ``e > m`` (under-segmentation) but ``|e| + m`` when ``e < -m`` (over-segmentation).
The ``+ m`` looks like a sign slip: the over-segmentation penalty jumps from 0 to ``2m`` at the band
edge instead of starting from 0, so the loss is discontinuous and its logged value is inflated
(with a linear penalty the constant does not change the gradient, but with any other shape it
would). The normalisation by ``max(p_hat, p_prior)`` also moves the over-segmentation edge to
``p_prior / (1 - m)`` (1.43 ``p_prior`` for ``m = 0.3``) while the under-segmentation edge stays at
``(1 - m) p_prior``. Here both directions use the same relative error and the same margin, so the
band is ``[(1 - m), (1 + m)] p_prior``, identical to the log-barrier's constraints below, and the
penalty starts from zero at both edges.

``"log-barrier"``: the log-barrier extension of Kervadec, Dolz, Yuan, Desrosiers, Granger & Ben
Ayed, "Constrained deep networks: Lagrangian optimization via log-barrier extensions" (2019)::

    psi_t(z) = -(1/t) log(-z)                     if z <= -1/t^2
               t z - (1/t) log(1/t^2) + 1/t       otherwise

applied to both constraints, ``lam * (psi_t(z_over) + psi_t(z_under))``, with ``t`` growing over
the iterations (``t0 * growth^step``) so the barrier approaches a hard constraint. It is the standard
log barrier where that is defined and steep (``z <= -1/t^2``) and its first-order (linear)
continuation beyond, so it is finite and differentiable for infeasible starts. Unlike the hinge its
gradient is not zero inside the band: it pulls gently towards the band's centre, less as ``t`` grows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ...errors import ConfigError
from ...registry import Registry

#: ``penalty(p_hat, p_prior, margin, t) -> per-element penalty`` (not yet weighted by lambda).
Penalty = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]

CONSTRAINTS: Registry[Penalty] = Registry("size constraint")


def band_violations(
    p_hat: torch.Tensor, p_prior: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_over, z_under)``: the two constraints in relative units (feasible where ``<= 0``).

    Args:
        p_hat: Predicted proportions (any shape).
        p_prior: Prior proportions (broadcastable, > 0).
        margin: Relative half-width ``m`` of the band, in ``[0, 1)``.
    """
    ratio = p_hat / p_prior
    return ratio - (1.0 + margin), (1.0 - margin) - ratio


def in_band(p_hat: torch.Tensor, p_prior: torch.Tensor, margin: float) -> torch.Tensor:
    """Boolean: ``(1 - m) p_prior <= p_hat <= (1 + m) p_prior`` elementwise."""
    over, under = band_violations(p_hat, p_prior, margin)
    return (over <= 0) & (under <= 0)


@CONSTRAINTS.register("hinge")
def hinge_penalty(p_hat: torch.Tensor, p_prior: torch.Tensor, margin: float, t: float = 1.0) -> torch.Tensor:
    """Squared hinge on the relative error beyond the margin: ``relu(|p_hat - p| / p - m)^2``.

    Args:
        p_hat: Predicted proportions.
        p_prior: Prior proportions (> 0).
        margin: Relative margin ``m``.
        t: Unused (the log-barrier's temperature; present so both penalties share one signature).

    Returns:
        The elementwise penalty (0 inside the band).
    """
    over, under = band_violations(p_hat, p_prior, margin)
    return torch.relu(over) ** 2 + torch.relu(under) ** 2


def log_barrier_extension(z: torch.Tensor, t: float) -> torch.Tensor:
    """Kervadec et al.'s log-barrier extension ``psi_t(z)`` of the constraint ``z <= 0``.

    ``-(1/t) log(-z)`` for ``z <= -1/t^2``; ``t z - (1/t) log(1/t^2) + 1/t`` beyond, which continues
    the barrier with its value and slope at ``z = -1/t^2``.

    Raises:
        ConfigError: when ``t <= 0``.
    """
    if not t > 0:
        raise ConfigError(f"log-barrier t must be positive, got {t}")
    edge = -1.0 / t**2
    barrier = -torch.log(-torch.clamp(z, max=edge)) / t
    linear = t * z - math.log(1.0 / t**2) / t + 1.0 / t
    return torch.where(z <= edge, barrier, linear)


@CONSTRAINTS.register("log-barrier")
def log_barrier_penalty(
    p_hat: torch.Tensor, p_prior: torch.Tensor, margin: float, t: float = 5.0
) -> torch.Tensor:
    """Log-barrier extensions of both band constraints: ``psi_t(z_over) + psi_t(z_under)``.

    Args:
        p_hat: Predicted proportions.
        p_prior: Prior proportions (> 0).
        margin: Relative margin ``m`` (> 0: the band must have an interior).
        t: Barrier temperature (larger: closer to a hard constraint).

    Returns:
        The elementwise penalty.
    """
    over, under = band_violations(p_hat, p_prior, margin)
    return log_barrier_extension(over, t) + log_barrier_extension(under, t)


def get_constraint(name: str) -> Penalty:
    """The penalty registered as ``name`` (``hinge`` or ``log-barrier``).

    Raises:
        ConfigError: on an unknown name, listing the valid ones.
    """
    return CONSTRAINTS.get(name)


__all__ = [
    "CONSTRAINTS",
    "Penalty",
    "band_violations",
    "get_constraint",
    "hinge_penalty",
    "in_band",
    "log_barrier_extension",
    "log_barrier_penalty",
]
