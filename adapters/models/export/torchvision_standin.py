"""An import-time stand-in for torchvision, for exporting models on CPU-only machines.

Why it exists: ``open_clip`` and ``timm`` import torchvision when they are imported (for image
transforms, datasets and ``torchvision.ops.misc.FrozenBatchNorm2d``), although building a model
and exporting it to ONNX never calls any of it. PyPI's torchvision is a CUDA build: beside the
CPU build of torch it fails to load (``operator torchvision::nms does not exist``), and once it is
installed it also breaks ``transformers``' imports. The project therefore installs open_clip and
timm without torchvision (see the Makefile) and, only when ``import torchvision`` fails, puts this
stand-in in its place:

* ``import torchvision`` and ``import torchvision.<anything>`` succeed and return empty modules;
* any name taken from them (``from torchvision.transforms import Normalize``) is a placeholder
  class, so that module-level imports, type annotations and subclassing work;
* using a placeholder (calling it, e.g. building a transform or a dataset) raises a
  ``RuntimeError`` that says torchvision is missing, so nothing silently computes the wrong thing.

``transformers`` caches whether torchvision is available the first time it is asked, by looking for
the module; the stand-in asks it before it is installed, so that transformers keeps treating
torchvision as absent and keeps to its torchvision-free code paths.

Where a working torchvision is installed, :func:`ensure_importable` changes nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["ensure_importable"]

logger = logging.getLogger(__name__)

_ROOT = "torchvision"


class _Placeholder(type):
    """Metaclass of the placeholder classes: attribute access yields more placeholders, calling
    one fails with a message naming what needed torchvision."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError(
            f"{cls.__qualname__} needs torchvision, which cannot load beside this torch build; "
            "model export does not need it (see adapters/models/export/torchvision_standin.py)"
        )


def _placeholder(qualname: str) -> type:
    return _Placeholder(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname})


class _StandInModule(types.ModuleType):
    """A torchvision module whose every public attribute is a placeholder class."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``torchvision`` and all its submodules, and loads each as a :class:`_StandInModule`."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == _ROOT or fullname.startswith(_ROOT + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to execute: attributes are made on first access."""


def _installed() -> bool:
    return any(isinstance(finder, _StandInFinder) for finder in sys.meta_path)


def ensure_importable() -> bool:
    """Make ``import torchvision`` succeed, with a stand-in when the real one cannot load.

    Call it before importing ``open_clip`` or ``timm``. When the real torchvision imports, it is
    left alone. Otherwise the stand-in described in this module's docstring is put first on
    ``sys.meta_path`` (once; later calls are no-ops), after removing whatever a failed import of
    the real package left in ``sys.modules``.

    Returns:
        ``True`` when the stand-in is in use, ``False`` when the real torchvision is.

    Example:
        >>> from adapters.models.export import torchvision_standin
        >>> torchvision_standin.ensure_importable()  # doctest: +SKIP
        True
        >>> import open_clip  # imports torchvision, now without failing  # doctest: +SKIP
    """
    if _installed():
        return True
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError, AttributeError) as error:
        # A broken build can fail part-way and leave submodules behind; they must not shadow
        # the stand-in's.
        for name in [n for n in sys.modules if n == _ROOT or n.startswith(_ROOT + ".")]:
            del sys.modules[name]
        _settle_transformers()
        sys.meta_path.insert(0, _StandInFinder())
        logger.info(
            "torchvision stand-in installed",
            extra={"reason": f"{type(error).__name__}: {error}"[:200]},
        )
        return True
    return False


def _settle_transformers() -> None:
    """Have transformers record, while it is true, that torchvision is unavailable."""
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.utils.import_utils import is_torchvision_available

    is_torchvision_available()
