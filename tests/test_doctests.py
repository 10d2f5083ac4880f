"""Run the examples in every package docstring, so documentation cannot drift from behaviour."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import woodfisher

# ``__main__`` modules run the CLI when imported.
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(woodfisher.__path__, prefix="woodfisher.")
    if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_examples_exist():
    attempted = sum(
        doctest.testmod(importlib.import_module(n), optionflags=doctest.ELLIPSIS).attempted
        for n in ("woodfisher.params", "woodfisher.fisher.base", "woodfisher.pruning.schedule")
    )
    assert attempted >= 8
