"""``medirag models``: build-tiny builds the three architectures reproducibly and resumes; export
refuses what it cannot export faithfully, in one line; verify refuses an altered folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapters.models.manifest import load_manifest, read_manifest
from deploy.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("cli-models")
    result = CliRunner().invoke(app, ["models", "build-tiny", "--out", str(out), "--seed", "0"])
    return out, result.output


def test_build_tiny_builds_the_three_architectures_verified(
    built: tuple[Path, str], tiny_dir: Path
) -> None:
    out, output = built
    kinds = {
        name: load_manifest(out / name).kind
        for name in ("tiny-biomedclip", "tiny-bge-m3", "tiny-reranker")
    }
    assert kinds == {
        "tiny-biomedclip": "image-text-embedder",
        "tiny-bge-m3": "dense-sparse-text-embedder",
        "tiny-reranker": "reranker",
    }, output
    # Seed 0 through the command is the same model the suite builds through the function.
    assert read_manifest(out / "tiny-biomedclip").model_id == read_manifest(tiny_dir).model_id
    for name in kinds:
        assert "RANDOM" in read_manifest(out / name).description


def test_build_tiny_resumes_and_refuses_a_folder_it_did_not_write(
    built: tuple[Path, str], tmp_path: Path
) -> None:
    out, _ = built
    again = CliRunner().invoke(app, ["models", "build-tiny", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert again.output.count("already built") == 3

    (tmp_path / "tiny-biomedclip").mkdir()
    (tmp_path / "tiny-biomedclip" / "notes.txt").write_text("not a model")
    refused = CliRunner().invoke(app, ["models", "build-tiny", "--out", str(tmp_path)])
    assert refused.exit_code == 2
    assert "holds files but not a valid model" in refused.output
    assert "Traceback" not in refused.output
    assert not (tmp_path / "tiny-bge-m3").exists()


def test_verify_accepts_an_intact_folder_and_refuses_an_altered_copy(
    tiny_dir: Path, tmp_path: Path
) -> None:
    ok = CliRunner().invoke(app, ["models", "verify", str(tiny_dir)])
    assert ok.exit_code == 0, ok.output
    assert read_manifest(tiny_dir).model_id in ok.output

    altered = shutil.copytree(tiny_dir, tmp_path / "altered")
    (altered / "preprocess.json").write_text('{"image_size": 224}')
    refused = CliRunner().invoke(app, ["models", "verify", str(tiny_dir), str(altered)])
    assert refused.exit_code == 1
    assert "refused" in refused.output
    assert "preprocess.json" in refused.output


def test_export_refuses_a_bge_m3_folder_without_its_sparse_weights(tmp_path: Path) -> None:
    missing = CliRunner().invoke(app, ["models", "export", "bge-m3", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2
    assert "needs --source" in missing.output

    # A source folder that FlagEmbedding would load with RANDOM sparse weights.
    from adapters.models.export.tiny_bge_m3 import write_tiny_bge_m3_source

    source = write_tiny_bge_m3_source(tmp_path / "bge-source", seed=0)
    (source / "sparse_linear.pt").unlink()
    target = tmp_path / "bge-m3"
    result = CliRunner().invoke(
        app, ["models", "export", "bge-m3", "--source", str(source), "--out", str(target)]
    )
    assert result.exit_code == 2
    assert "sparse_linear.pt" in result.output
    assert "Traceback" not in result.output
    assert not target.exists() or not any(target.iterdir())
    assert not list(tmp_path.glob(".bge-m3.*"))
