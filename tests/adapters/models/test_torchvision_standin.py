"""The torchvision stand-in lets open_clip and timm import, fails loudly when used, and stays out
of the way of a real torchvision."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.models.export import torchvision_standin

REPO = Path(__file__).resolve().parents[3]


def _torchvision_installed() -> bool:
    try:
        importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(_torchvision_installed(), reason="a torchvision distribution is installed")
def test_stand_in_imports_and_refuses_to_compute() -> None:
    assert torchvision_standin.ensure_importable() is True
    assert torchvision_standin.ensure_importable() is True
    finders = [f for f in sys.meta_path if type(f).__name__ == "_StandInFinder"]
    assert len(finders) == 1

    from torchvision.ops.misc import FrozenBatchNorm2d
    from torchvision.transforms import Normalize

    class Subclass(FrozenBatchNorm2d):  # type: ignore[misc]
        pass

    assert Normalize.__qualname__ == "torchvision.transforms.Normalize"
    with pytest.raises(RuntimeError, match="needs torchvision"):
        Normalize(mean=(0.5,), std=(0.5,))
    with pytest.raises(RuntimeError, match="needs torchvision"):
        Subclass(8)
    # transformers reads distribution metadata, so it still sees torchvision as absent.
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("torchvision")
    from transformers.utils.import_utils import is_torchvision_available

    assert not is_torchvision_available()


def test_open_clip_and_timm_import_with_it() -> None:
    torchvision_standin.ensure_importable()
    import open_clip
    import timm

    assert callable(open_clip.create_model)
    assert timm.models.is_model("vit_base_patch16_224")


def test_a_working_torchvision_is_left_alone(tmp_path: Path) -> None:
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text("REAL = True\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    script = (
        "import sys\n"
        "from adapters.models.export import torchvision_standin\n"
        "print(torchvision_standin.ensure_importable())\n"
        "import torchvision\n"
        "print(torchvision.REAL, len(sys.meta_path))\n"
    )
    before = subprocess.run(
        [sys.executable, "-c", "import sys; print(len(sys.meta_path))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "True", before.stdout.strip()]
