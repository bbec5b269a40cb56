"""The batch journal: what makes `run-batch` resumable.

A msgpack stream beside the output (`OUT.jsonl.journal`): a header naming the
input (path, size, mtime, hash of its first MiB) and the options that shape
results, then one entry per output line, written after that line is flushed.
Killed at any moment and rerun with the same arguments, run-batch keeps the
output lines the journal vouches for (each input line once), drops any line
written after the last journal entry, and serves only the rest.

    header  {"kind": "header", "version": 1, "input": {...}, "options": {...}}
    entry   {"kind": "done", "line": 17}
    footer  {"kind": "complete"}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

VERSION = 1


class JournalMismatch(ValueError):
    """The output's journal belongs to a different input or options: refuse to mix two batches."""


def input_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_sha256": head}


@dataclass
class Journal:
    path: Path
    done: set[int] = field(default_factory=set)
    complete: bool = False
    _stream: BinaryIO | None = None

    @classmethod
    def for_output(cls, output: Path) -> Journal:
        return cls(output.with_name(output.name + ".journal"))

    def open(self, output: Path, identity: dict[str, Any], options: dict[str, Any], resume: bool) -> None:
        """Start fresh, or resume: keep the journaled output lines and truncate the rest."""
        header = {"kind": "header", "version": VERSION, "input": identity, "options": options}
        if resume and self.path.exists() and output.exists():
            self._load(header)
            _keep_lines(output, self.done)
            self._stream = open(self.path, "ab")
        else:
            self.done, self.complete = set(), False
            output.write_text("")
            self._stream = open(self.path, "wb")
            self._write(header)

    def _load(self, header: dict[str, Any]) -> None:
        with open(self.path, "rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False)
            try:
                first = next(unpacker)
            except (StopIteration, msgpack.ExtraData, ValueError) as e:
                raise JournalMismatch(f"{self.path} is empty or unreadable; delete it to start over") from e
            if first.get("version") != VERSION or first.get("input") != header["input"] \
                    or first.get("options") != header["options"]:
                raise JournalMismatch(
                    f"{self.path} belongs to another run (input or options differ); delete it and the output "
                    "to start over, or rerun with the original arguments")
            try:
                for entry in unpacker:
                    if entry.get("kind") == "done":
                        self.done.add(int(entry["line"]))
                    elif entry.get("kind") == "complete":
                        self.complete = True
            except (msgpack.OutOfData, ValueError):
                pass  # a torn last entry from a kill: the line it named is served again

    def record(self, line: int) -> None:
        self.done.add(line)
        self._write({"kind": "done", "line": line})

    def finish(self) -> None:
        self.complete = True
        self._write({"kind": "complete"})

    def _write(self, obj: dict[str, Any]) -> None:
        assert self._stream is not None, "journal not open"
        self._stream.write(msgpack.packb(obj))
        self._stream.flush()

    def close(self) -> None:
        if self._stream is not None:
            os.fsync(self._stream.fileno())  # each entry is flushed as written; this makes the run's durable
            self._stream.close()
            self._stream = None


def _keep_lines(output: Path, done: set[int]) -> None:
    """Rewrite the output with the first record of each journaled input line; drop the rest."""
    kept: list[str] = []
    seen: set[int] = set()
    with open(output, encoding="utf-8", errors="replace") as f:
        for text in f:
            if not text.endswith("\n"):
                break  # torn last line
            try:
                line = json.loads(text)["pdserve"]["line"]
            except (ValueError, KeyError, TypeError):
                continue
            if line in done and line not in seen:
                seen.add(line)
                kept.append(text)
    done.intersection_update(seen)  # journaled but missing from the output: serve again
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
