"""One run at a time per results folder: a lock file holding the owner's pid.

The lock is an advisory `flock` on `<folder>/.sw-analyze.lock`, so the kernel releases it when
its process ends, however it ends: a lock file left by a killed run is stale by construction
and the next run takes it over (saying so). The file records pid, host, run and start time,
so a refused run can say who holds the folder.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from datetime import datetime
from pathlib import Path

log = logging.getLogger("sw_lib.runlock")

LOCK_NAME = ".sw-analyze.lock"
INDEX_LOCK_NAME = ".sw-index.lock"  # the report index's writers (a folder may be both)


class FolderLocked(RuntimeError):
    """Another live process holds the folder; the message is one line naming it."""


class RunLock:
    """`with RunLock(folder):` holds the folder for this process (wait=False: refuse at once
    when another process holds it; wait=True: block until it is free)."""

    def __init__(self, folder: str | Path, wait: bool = False, what: str = "results folder",
                 name: str = LOCK_NAME):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.wait = wait
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            owner = _read(fd)
            os.close(fd)
            raise FolderLocked(
                f"{self.what} '{self.folder}' is in use by another run (pid {owner.get('pid', '?')}"
                f" on {owner.get('host', '?')}, started {owner.get('started', '?')}); wait for it "
                "to finish or choose another --results-dir") from None
        previous = _read(fd)
        if previous.get("pid") and not self.wait:
            log.info("%s: took over a stale lock of pid %s (that process is gone)",
                     self.folder, previous["pid"])
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": datetime.now().isoformat(timespec="seconds")}
                                 ).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        # Emptied, not deleted: deleting a locked file lets two later runs lock two inodes.
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def owner(self) -> dict:
        """What the lock file says about its holder ({} when free or unreadable)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {}
