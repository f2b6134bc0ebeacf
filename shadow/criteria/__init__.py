"""Importance criteria: per-example scores of every attention head and FFN unit, one file per criterion.

A criterion scores the units of one layer from what the scoring pass captured there (``Units``). Heads and
FFN units share one layout, ``(B, T, U, k)``: a head is a unit with k = d dimensions (its slice of the attention
output projection's input), an FFN unit one with k = 1 (its activation, the down projection's input). So most
criteria are one formula for both kinds. Gradients are of each example's own loss: one backward pass of the
summed loss gives them for the whole batch, since examples do not interact. Sums over tokens skip padding. Higher
scores mean "keep": the policy keeps each example's top scores.

Definitions follow ShadowLLM (arXiv 2406.16635) and the papers it borrows from (variant ``textbook``). What
ShadowLLM's reference code (abdelfattah-lab/shadow_llm, ``lm_eval/base.py``; batch size 1, so every token of an
example) computed is the ``reference`` variant (criterion.variant=reference), for every criterion that code had;
where it computed the textbook form, ``reference`` is the same Criterion.

Notation in the files: per layer, head h with a, g its slice of the attention output and that slice's gradient;
FFN unit n with u its pre-activation, z = σ(u) its activation and g = ∂L/∂z; W1 the up projection (a unit's
row), W2 the down projection (its column). G = Σ_t <a_t, g_t> (Σ_t z_t g_t) is ∂L/∂gate of a multiplicative gate
on the unit.

A new criterion is a module here that calls ``register`` and a YAML file in conf/criterion/ (docs/extending.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from shadow.criteria.base import CRITERIA, EPS, Criterion, Needs, Units, get_criterion, register

__all__ = ["CRITERIA", "EPS", "Criterion", "Needs", "Units", "get_criterion", "register"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
