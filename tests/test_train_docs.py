"""The docstring examples of the training layer (and the demo's models) run and print
what they say (with ``torch`` and ``kdfast`` imported, as the examples assume)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import kdfast
import kdfast.demo.models
import kdfast.train

MODULES = sorted({"kdfast.train", "kdfast.demo.models"}
                 | {m.name for m in pkgutil.walk_packages(kdfast.train.__path__, "kdfast.train.")})


def _examples():
    finder = doctest.DocTestFinder()
    for name in MODULES:
        module = importlib.import_module(name)
        for test in finder.find(module, name, extraglobs={"torch": torch, "kdfast": kdfast}):
            if test.examples and test.name.startswith(name):
                yield pytest.param(test, id=test.name)


@pytest.mark.parametrize("test", list(_examples()))
def test_docstring_example(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    torch.manual_seed(0)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{test.name}: {result.failed} of {result.attempted} examples failed"
