"""engine.manifest: the one reader and writer of checkpoints/lab/manifest.json, and the callers on it."""
import json

import pytest

from bench import common, readme
from engine import manifest
from engine.errors import UserError
from engine.models import bundled_checkpoint


@pytest.fixture
def tmp_manifest(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    monkeypatch.setattr(manifest, "PATH", path)
    return path


def test_record_adds_and_replaces_entries_keeping_the_others(tmp_manifest):
    assert manifest.read()["models"] == {} and manifest.entry("clean") is None  # no file yet
    manifest.record("clean", {"file": "clean.safetensors", "ca": 80.0, "seconds": 1, "command": "a"})
    manifest.record("badnet", {"file": "badnet.safetensors", "ca": 79.0, "asr": 98.0, "seconds": 2, "command": "b"})
    manifest.record("clean", {"file": "clean.safetensors", "ca": 81.0, "seconds": 3, "command": "a && c"})
    saved = json.loads(tmp_manifest.read_text())
    assert saved["model"] == "lab-vit" and list(saved["models"]) == ["clean", "badnet"]
    assert manifest.entry("clean")["ca"] == 81.0 and manifest.entry("badnet")["asr"] == 98.0
    assert manifest.models() == saved["models"] == manifest.read()["models"]


def test_bundled_means_the_checkpoint_file_is_next_to_the_manifest(tmp_manifest):
    manifest.record("badnet", {"file": "badnet.safetensors", "ca": 1.0, "asr": 2.0, "seconds": 0, "command": "x"})
    manifest.record("wanet", {"file": "wanet.safetensors", "ca": 1.0, "asr": 2.0, "seconds": 0, "command": "y"})
    (tmp_manifest.parent / "badnet.safetensors").write_bytes(b"")
    assert manifest.checkpoint(manifest.entry("badnet")) == tmp_manifest.parent / "badnet.safetensors"
    assert manifest.bundled(manifest.entry("badnet")) and not manifest.bundled(manifest.entry("wanet"))
    assert common.bundled_attacks() == ["badnet"]
    table = readme.lab_models_table()
    assert "| badnet | yes |" in table and "| wanet | no (rebuild: see command) |" in table


@pytest.mark.parametrize("text", ["{not json", "[]", '{"models": 3}'])
def test_a_broken_manifest_is_one_user_error_naming_it(tmp_manifest, text):
    tmp_manifest.write_text(text)
    with pytest.raises(UserError, match="manifest.json"):
        manifest.entry("clean")


def test_unbundled_checkpoint_error_reads_the_manifest_module(tmp_manifest):
    manifest.record("nosuch", {"file": "nosuch.safetensors", "ca": 1.0, "seconds": 0, "note": "left out",
                               "command": "python -m engine.lab poison --attack nosuch"})
    with pytest.raises(UserError, match=r"\(left out\).*build it with: python -m engine.lab poison --attack nosuch"):
        bundled_checkpoint("nosuch")
