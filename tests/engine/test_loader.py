"""The GGUF conversion cache: keyed by content, so a copy elsewhere reuses the converted weights."""

from __future__ import annotations

import shutil

from engine.config import default_cache_dir
from engine.loader import default_gguf_path, gguf_cache_key, resolve_model


def test_copied_gguf_reuses_the_conversion(default_model_dir, tmp_path):
    copy = tmp_path / "elsewhere" / default_gguf_path().name
    copy.parent.mkdir()
    shutil.copyfile(default_gguf_path(), copy)
    converted = default_model_dir / "model.safetensors"
    before = converted.stat().st_mtime_ns
    assert resolve_model(str(copy), default_cache_dir()) == default_model_dir
    assert converted.stat().st_mtime_ns == before  # not converted again


def test_cache_key_follows_content(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    data = bytes(range(256)) * (3 << 16)  # 48 MiB: head and tail samples do not overlap
    a.write_bytes(data)
    b.write_bytes(data[:-1] + b"\x00")  # last byte differs
    assert gguf_cache_key(a) != gguf_cache_key(b)
    b.write_bytes(data)
    assert gguf_cache_key(a) == gguf_cache_key(b)
