import json
import logging
import sys

import pytest

from adapters.models.manifest import MANIFEST_NAME, load_manifest
from deploy.default_models import ExportUnavailable, ensure_default_models
from deploy.logs import configure_logging


def test_json_logs_keep_extra_fields(capsys):
    configure_logging("json")
    try:
        logging.getLogger("medirag.test").warning("hook answered", extra={"cards": 2, "ms": 1.5})
    finally:
        logging.getLogger().handlers.clear()
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["msg"] == "hook answered"
    assert record["level"] == "warning"
    assert (record["cards"], record["ms"]) == (2, 1.5)


def test_default_image_model_is_built_once(tmp_path):
    said = []
    built = ensure_default_models(tmp_path, text_model="custom-text", say=said.append)
    assert built == ["tiny-biomedclip"]
    assert load_manifest(tmp_path / "tiny-biomedclip").name == "tiny-biomedclip"
    assert not (tmp_path / "custom-text").exists()  # only the defaults are built here
    assert ensure_default_models(tmp_path, text_model="custom-text") == []
    assert len(said) == 1


def test_missing_export_dependencies_are_explained(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "adapters.models.export.tiny", None)  # import fails
    with pytest.raises(ExportUnavailable, match="make demo` installs them"):
        ensure_default_models(tmp_path, text_model="custom-text")
    assert not (tmp_path / "tiny-biomedclip" / MANIFEST_NAME).exists()
