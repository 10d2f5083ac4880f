"""Run the examples in the package docstrings."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "woodfisher.data",
    "woodfisher.models",
    "woodfisher.checkpoint",
    "woodfisher.train",
    "woodfisher.gradual",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
