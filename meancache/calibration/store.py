"""Calibrations that persist between processes: one JSON file per key under ``$MEANCACHE_HOME/calibrations``.

A *key* is a JSON-serialisable dict describing everything that changes a model's trajectories (the diffusers
integration builds it: :func:`meancache.integrations.diffusers.key.calibration_key`); its digest names the
file. Rules:

* The home is ``$MEANCACHE_HOME``, else ``~/.cache/meancache``.
* ``<home>/calibrations/<digest>.json`` is a plain calibration file (:meth:`Calibration.load` and
  ``meancache schedule`` read it) whose metadata holds the ``key`` and its ``key_digest``; beside it,
  ``<digest>.uses`` counts the generations served by it since it was last saved (first use's progressive
  calibration runs a full generation again after a number of them), and ``<digest>.runs.pt`` keeps the
  calibrating generations' recorded runs for replay (:meth:`CalibrationStore.runs`; a file that cannot be read
  is treated as holding none).
* Writes are atomic: a temporary file in the same folder, then :func:`os.replace`. Two processes writing one
  key each replace the whole file (the last writer wins); a reader never sees a partial file.
* A file that cannot be read, is not a calibration, or holds another key's calibration (truncated, corrupt,
  foreign JSON) gets a warning naming its path and is treated as absent: the key is calibrated again and the
  next save replaces the file.
* A home that cannot be created or written (read-only, or no home directory) gets one warning; calibrations
  are then kept in memory for the rest of the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meancache.calibration.costs import Calibration

HOME_ENV = "MEANCACHE_HOME"
"""Environment variable naming the folder MeanCache keeps its calibrations in."""
CALIBRATIONS_DIR = "calibrations"

logger = logging.getLogger(__name__)


def meancache_home() -> Path | None:
    """``$MEANCACHE_HOME``, else ``~/.cache/meancache``; None when there is no home directory to resolve."""
    configured = os.environ.get(HOME_ENV)
    if configured:
        return Path(configured).expanduser()
    try:
        return Path.home() / ".cache" / "meancache"
    except RuntimeError:  # no HOME and no password-database entry
        return None


def key_digest(key: Mapping[str, Any]) -> str:
    """The first 16 hex digits of the SHA-256 of ``key`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def combine_calibrations(first: Calibration, second: Calibration) -> Calibration:
    """Both calibrations' trajectories in one: costs averaged with weights ``trajectories`` (``aggregate="mean"``)
    or their elementwise maximum (``"max"``). They must share sigmas, max gap, max span and aggregate."""
    for name in ("sigmas", "max_gap", "max_span", "aggregate"):
        if getattr(first, name) != getattr(second, name):
            raise ValueError(f"cannot combine calibrations with different {name}: {getattr(first, name)!r} and "
                             f"{getattr(second, name)!r}")  # fmt: skip
    total = first.trajectories + second.trajectories
    pairs = ((first.one_shot, second.one_shot), (first.closed_loop, second.closed_loop))
    if first.aggregate == "max":
        costs = [np.maximum(a, b) for a, b in pairs]
    else:
        costs = [np.where(np.isfinite(a), (a * first.trajectories + b * second.trajectories) / total, np.inf)
                 for a, b in pairs]  # fmt: skip
    metadata = {**first.metadata, **second.metadata}
    if "calibration_seconds" in first.metadata and "calibration_seconds" in second.metadata:
        metadata["calibration_seconds"] = first.metadata["calibration_seconds"] + second.metadata["calibration_seconds"]
    return Calibration(first.sigmas, first.max_gap, first.max_span, *costs, total, first.aggregate, metadata)


class CalibrationStore:
    """Calibrations by key, on disk under ``root`` (``None``: in memory only); see the module docstring."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.folder = root / CALIBRATIONS_DIR if root is not None else None
        self._memory: dict[str, Calibration] = {}
        """Every calibration this process saved or loaded, by digest (all of them when the folder is unusable)."""
        self._uses: dict[str, int] = {}
        """Per digest, :meth:`uses` when the folder is unusable."""
        self._versions: dict[str, tuple[int, int]] = {}
        """Per digest, the file's ``(st_mtime_ns, st_size)`` when ``_memory`` last took its calibration from it or
        wrote it there: every generation of a key resolves its calibration, and parsing the file again each time
        allocates thousands of lists."""
        self._runs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        """Per digest, :meth:`runs` when the folder is unusable."""
        self._writable = root is not None

    def path(self, key: Mapping[str, Any]) -> Path | None:
        """The file of ``key`` (None without a usable home)."""
        return self.folder / f"{key_digest(key)}.json" if self.folder is not None else None

    def load(self, key: Mapping[str, Any]) -> Calibration | None:
        """The calibration stored for ``key``, or None (absent, or unusable: warned)."""
        digest = key_digest(key)
        path = self.path(key)
        if path is None:
            return self._memory.get(digest)
        try:
            version = _version(path)
        except OSError:  # no file (yet)
            return self._memory.get(digest)
        if self._versions.get(digest) == version and digest in self._memory:
            return self._memory[digest]
        try:
            calibration = Calibration.load(path)
        except (OSError, ValueError, TypeError, KeyError) as e:
            logger.warning("MeanCache: ignoring the unreadable calibration file %s (%s); calibrating again", path, e)
            return self._memory.get(digest)
        stored = calibration.metadata.get("key")
        if calibration.metadata.get("key_digest") != digest or stored != json.loads(json.dumps(dict(key))):
            logger.warning("MeanCache: ignoring %s: it holds the calibration of another key; calibrating again", path)
            return self._memory.get(digest)
        self._memory[digest] = calibration
        self._versions[digest] = version
        return calibration

    def save(self, key: Mapping[str, Any], calibration: Calibration) -> Path | None:
        """Store ``calibration`` for ``key``: the file written, or None when kept in memory only."""
        digest = key_digest(key)
        calibration.metadata |= {"key": json.loads(json.dumps(dict(key))), "key_digest": digest}
        self._memory[digest] = calibration
        self._uses.pop(digest, None)
        if not self._writable or self.folder is None:
            return None
        path = self.folder / f"{digest}.json"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{digest}.", suffix=".tmp")
            os.close(handle)
            try:
                calibration.save(temporary)
                os.replace(temporary, path)
                self._versions[digest] = _version(path)
                (self.folder / f"{digest}.uses").unlink(missing_ok=True)
            finally:
                if os.path.exists(temporary):
                    os.unlink(temporary)
        except OSError as e:
            self._writable = False
            logger.warning(
                "MeanCache: cannot write calibrations under %s (%s); keeping them in memory for this process. "
                "Set %s to a writable folder to keep them.", self.folder, e, HOME_ENV,
            )  # fmt: skip
            return None
        return path

    def uses(self, key: Mapping[str, Any]) -> int:
        """Generations served by ``key``'s calibration since it was last saved (:meth:`set_uses`), read from the
        file beside it (``<digest>.uses``), so every process counts them."""
        digest = key_digest(key)
        path = self._uses_path(digest)
        if path is None or not self._writable:
            return self._uses.get(digest, 0)
        try:
            return int(path.read_text())
        except (OSError, ValueError):  # absent (none yet) or unreadable: count afresh
            return 0

    def set_uses(self, key: Mapping[str, Any], count: int) -> None:
        """Record ``count`` generations served by ``key``'s calibration (a save starts the count again at 0)."""
        digest = key_digest(key)
        self._uses[digest] = count
        path = self._uses_path(digest)
        if path is not None and self._writable:
            with contextlib.suppress(OSError):  # an unwritable folder was warned about at save
                path.write_text(str(count))

    def runs(self, key: Mapping[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The recorded runs kept for ``key`` (:meth:`add_run`), oldest first: per run its latents and velocities as
        ``(N, elements)`` tensors; none when nothing is kept or the file cannot be read (warned)."""
        digest = key_digest(key)
        path = self._runs_path(digest)
        if path is None or not self._writable or not path.exists():
            return list(self._runs.get(digest, []))
        try:
            stored = torch.load(path, weights_only=True)
            runs = [(latents, velocities) for latents, velocities in zip(*stored, strict=True)]
            if not all(isinstance(t, torch.Tensor) and t.ndim == 2 and t.shape == run[0].shape
                       for run in runs for t in run):  # fmt: skip
                raise ValueError("it does not hold pairs of (steps, elements) tensors")
            return runs
        except (OSError, RuntimeError, ValueError, TypeError, pickle.UnpicklingError) as e:
            logger.warning("MeanCache: ignoring the unreadable recorded runs %s (%s)", path, e)
            return []

    def add_run(self, key: Mapping[str, Any], latents: torch.Tensor, velocities: torch.Tensor) -> None:
        """Keep one more recorded run for ``key`` (``(N, elements)`` latents and velocities), written atomically
        beside its calibration file."""
        digest = key_digest(key)
        runs = [*self.runs(key), (latents, velocities)]
        self._runs[digest] = runs
        path = self._runs_path(digest)
        if path is None or not self._writable:
            return
        with contextlib.suppress(OSError):  # an unwritable folder is warned about at save
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{digest}.", suffix=".tmp")
            os.close(handle)
            try:
                torch.save([[r[0] for r in runs], [r[1] for r in runs]], temporary)
                os.replace(temporary, path)
            finally:
                if os.path.exists(temporary):
                    os.unlink(temporary)

    def _runs_path(self, digest: str) -> Path | None:
        return self.folder / f"{digest}.runs.pt" if self.folder is not None else None

    def _uses_path(self, digest: str) -> Path | None:
        return self.folder / f"{digest}.uses" if self.folder is not None else None

    def files(self) -> list[Path]:
        """The stored calibration files, oldest first."""
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(self.folder.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name))

    def remove(self, digests: Iterable[str] = ()) -> list[Path]:
        """Delete the files whose digest starts with one of ``digests`` (all files when empty); the removed files.

        A prefix matching no file, or more than one, is an error naming it (nothing is deleted then)."""
        files = self.files()
        chosen: list[Path] = []
        for prefix in dict.fromkeys(digests):
            matches = [p for p in files if p.stem.startswith(prefix)]
            if len(matches) != 1:
                found = "no stored calibration" if not matches else f"{len(matches)} stored calibrations"
                raise ValueError(f"key {prefix!r} matches {found}; `meancache calibrations list` shows the keys")
            chosen += matches
        targets = chosen if chosen else files
        for path in targets:
            path.unlink(missing_ok=True)
            path.with_suffix(".uses").unlink(missing_ok=True)
            path.with_suffix(".runs.pt").unlink(missing_ok=True)
            self._memory.pop(path.stem, None)
            self._runs.pop(path.stem, None)
            self._uses.pop(path.stem, None)
            self._versions.pop(path.stem, None)
        return targets


def _version(path: Path) -> tuple[int, int]:
    """What changes when a file is rewritten: its modification time (ns) and size."""
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


_STORES: dict[Path | None, CalibrationStore] = {}


def calibration_store() -> CalibrationStore:
    """The process's store for the current home (:func:`meancache_home`, read on each call)."""
    root = meancache_home()
    if root not in _STORES:
        if root is None:
            logger.warning("MeanCache: no home directory for calibrations; set %s. Keeping them in memory.", HOME_ENV)
        _STORES[root] = CalibrationStore(root)
    return _STORES[root]
