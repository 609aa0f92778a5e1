"""The Examples in docstrings run and say what they show: each module's doctests, as a test."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

from tests.conftest import REPO

PACKAGES = ("core", "cds_hooks", "adapters", "deploy", "fixtures")
# Export code imports torch and open_clip; its examples need real checkpoints, not doctests.
SKIP = ("adapters.models.export",)


def modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for info in pkgutil.walk_packages([str(REPO / package)], prefix=f"{package}."):
            if not info.name.startswith(SKIP):
                names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", modules())
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} docstring example(s) of {name} failed"
