"""Every option of a conf/ group that names an implementation has one registered under its name, and every
registered implementation has its option."""

from __future__ import annotations

from shadow.compose import conf_options
from shadow.criteria import CRITERIA, Needs
from shadow.placements import PLACEMENTS


def test_every_criterion_option_is_registered_and_back():
    assert conf_options("criterion") == sorted(CRITERIA)


def test_every_placement_option_is_registered_and_back():
    assert conf_options("predictor") == sorted(PLACEMENTS)


def test_every_criterion_has_a_textbook_form_and_typed_needs():
    for name, variants in CRITERIA.items():
        assert "textbook" in variants and set(variants) <= {"textbook", "reference"}, name
        for criterion in variants.values():
            assert criterion.name == name and isinstance(criterion.needs, Needs)
            assert (criterion.heads is None) == (Needs.HESSIAN in criterion.needs)


def test_placements_say_what_they_build():
    trained = {name for name, p in PLACEMENTS.items() if p.trains}
    assert trained == {"shadow", "dejavu"}
    assert {name for name, p in PLACEMENTS.items() if p.uses_traces} == {"static", "shadow", "dejavu"}
    for name, placement in PLACEMENTS.items():
        groups = placement.groups(4, 0, False)
        assert bool(groups) == placement.trains, name
        if groups:  # the networks together predict every layer once
            assert sorted(t for _, targets in groups for t in targets) == [0, 1, 2, 3]
