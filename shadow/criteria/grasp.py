"""grasp: +H g at gate θ = 1, H the Hessian of the example's loss over all its gates and g = ∂L/∂θ. GraSP (Wang
et al. 2020) removes the units with the largest −θ ⊙ Hg, so keeping the highest +Hg drops those first.

Computed by ``traces.gate_hessian_scores`` (a double backward over every layer's gates at once); the
reference's version was defective (REFERENCE.md), so there is no reference variant.
"""

from __future__ import annotations

from shadow.criteria.base import Criterion, Needs, register

register(Criterion("grasp", None, None, Needs.HESSIAN))
