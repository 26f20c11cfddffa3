"""The `--output` of a batch run: proven to be vengine's own before anything touches it, and
locked so that only one run appends to it.

A file that is not a vengine output (a notes file, the input itself, through any link) is
refused untouched. The lock is `fcntl.flock` on the output's open file: the kernel drops it
when the process dies, so a `kill -9` never leaves a stale lock behind. Nothing is truncated
until every check, including those that need the model, has passed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from vengine.errors import ConfigError, VengineError

RESULT_KEYS = frozenset({"id", "text"})  # every row vengine writes has these
TORN_PREFIX = b'{"id": '  # how every row vengine writes starts (json.dumps of {"id": ...})


def scan_output(path: Path) -> tuple[set, int, int]:
    """(ids, bytes up to the last newline, size) of an existing vengine output, read-only.

    Raises ConfigError naming the first line that is not a vengine result row."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"--output {path}: cannot read ({e.strerror})") from None
    good = data.rfind(b"\n") + 1
    ids = set()
    for n, line in enumerate(data[:good].split(b"\n")[:-1], 1):
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and RESULT_KEYS <= row.keys()
        except (json.JSONDecodeError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise ConfigError(f"--output {path}: line {n} is not a vengine result row; refusing "
                              "to touch a file vengine did not write (choose another --output)")
        ids.add(row["id"])
    if good < len(data) and not data[good:].startswith(TORN_PREFIX):
        raise ConfigError(f"--output {path}: its last line is not a vengine result row; "
                          "refusing to touch it (choose another --output)")
    return ids, good, len(data)


def done_ids(path: Path) -> set:
    """Ids already in a vengine output; a torn last line (a killed run) is cut off the file."""
    if not path.exists():
        return set()
    ids, good, size = scan_output(path)
    if good < size:
        try:
            os.truncate(path, good)
        except OSError as e:
            raise ConfigError(f"--output {path}: cannot cut its torn last line ({e.strerror})") from None
    return ids


class OutputFile:
    """The open, locked output; `append` writes one whole row per os.write."""

    def __init__(self, path: Path, input_path: Path) -> None:
        self.path, self.rows = path, 0
        if path.is_dir():
            raise ConfigError(f"--output {path}: is a directory")
        if path.is_symlink() and not path.exists():
            raise ConfigError(f"--output {path}: a symlink to nothing; give the target itself")
        existed = path.exists()
        if not existed and not path.parent.is_dir():  # path.parent follows no link: fine here
            raise ConfigError(f"--output {path}: directory {path.parent} does not exist")
        if existed and not path.is_file():
            raise ConfigError(f"--output {path}: not a regular file")
        if existed and os.path.samefile(path, input_path):
            raise ConfigError(f"--output {path} is the --input file (through a link or not); "
                              "the results would replace the prompts: choose another --output")
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"--output {path}: cannot open for writing ({e.strerror})") from None
        self.created = not existed
        try:
            self._lock()
            self.ids, self.good, self.size = scan_output(path) if existed else (set(), 0, 0)
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"--output {self.path}: cannot lock ({e.strerror})") from None
            raise ConfigError(f"--output {self.path}: another vengine run is writing it; "
                              "wait for it to finish or choose another --output") from None

    def check_truncatable(self, resume: bool) -> None:
        """Fail now, not after the model loads, where the run would have to truncate a file
        that refuses it (an append-only file): a same-size ftruncate changes nothing."""
        if (not resume and self.size) or self.good < self.size:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError as e:
                raise ConfigError(f"--output {self.path}: cannot be truncated ({e.strerror}); "
                                  "choose another --output") from None

    def start(self, resume: bool) -> set:
        """Empty the file (--no-resume) or cut a torn last line; the ids already done."""
        if not resume:
            os.ftruncate(self.fd, 0)
            return set()
        return done_ids(self.path)

    def append(self, row: dict[str, Any]) -> None:
        """One write of one whole line, at once: a kill never leaves half a row except from a
        crash inside write(), which the next run's done_ids repairs."""
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:
            raise VengineError(f"--output {self.path}: write failed ({e.strerror}) after "
                               f"{self.rows} rows; run the same command again to finish") from None
        self.rows += 1

    def close(self) -> None:
        """Release the lock; a file this run created and never wrote to is removed again."""
        if self.fd < 0:
            return
        if self.created and self.rows == 0 and os.fstat(self.fd).st_size == 0:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1
