"""The ``register --report`` file, fed as the run goes.

A bulk run keeps only the first invalid and refused localparts in memory (see
:data:`~bridge_kit.puppets.results.KEPT_PROBLEMS`); the report lists every one.
So each problem goes to an anonymous spool file as it happens (``on_problem``),
and :meth:`ReportWriter.write` streams them from there into the report: memory
stays flat whether a run finds ten problems or ten million.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Final

from bridge_kit.puppets.results import ProblemKind

__all__ = ["ReportWriter"]

#: Which report key lists which kind of problem.
_LISTS: Final[dict[str, ProblemKind]] = {"invalid_reasons": "invalid", "failures": "failed"}


class ReportWriter:
    """Spools problems for the report at ``path``; use as a context manager.

    The spools live beside the report (anonymous, mode 0600, gone on close), so
    a directory where the report cannot be written fails before anything is sent.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._spools: dict[ProblemKind, IO[str]] = {}

    def __enter__(self) -> ReportWriter:
        for kind in _LISTS.values():
            self._spools[kind] = tempfile.TemporaryFile(
                "w+", encoding="utf-8", dir=self.path.absolute().parent
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for spool in self._spools.values():
            spool.close()
        self._spools.clear()

    def __call__(self, kind: ProblemKind, localpart: str, reason: str) -> None:
        """Record one problem (the ``on_problem`` callback of ``register_many``)."""
        self._spools[kind].write(json.dumps([localpart, reason]) + "\n")

    def write(self, report: Mapping[str, Any]) -> None:
        """Write ``report`` with its problem lists taken from the spools, privately
        (mode 0600: it names the homeserver and every refused localpart) and
        atomically (a reader sees the old report or the new one, never half)."""
        fd, temporary = tempfile.mkstemp(
            dir=self.path.absolute().parent, prefix=f".{self.path.name}."
        )
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                os.fchmod(fd, 0o600)  # exactly: a umask may also take the owner's bits
                for chunk in self._json(report):
                    file.write(chunk)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _json(self, report: Mapping[str, Any]) -> Iterator[str]:
        """``report`` as indented JSON text, in pieces; ASCII, because a localpart from
        the command line may hold bytes that are not UTF-8 (as lone surrogates)."""
        yield "{"
        for index, (key, value) in enumerate(report.items()):
            yield ("," if index else "") + f"\n  {json.dumps(key)}: "
            if key in _LISTS:
                yield from self._listed(self._spools[_LISTS[key]])
            else:
                yield json.dumps(value)
        yield "\n}\n"

    @staticmethod
    def _listed(spool: IO[str]) -> Iterator[str]:
        spool.flush()
        spool.seek(0)
        yield "{"
        first = True
        for line in spool:
            localpart, reason = json.loads(line)
            separator = "" if first else ","
            yield f"{separator}\n    {json.dumps(localpart)}: "
            yield json.dumps(reason)
            first = False
        yield "{}".format("}" if first else "\n  }")
