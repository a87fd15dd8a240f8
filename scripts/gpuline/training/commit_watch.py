"""A commit under way, followed from outside: its files as they appear, then whether it was committed.

:func:`gpuline.training.checkpoints.commit_checkpoint` fills ``.tmp-step-NNNNNNNN-<hex>/`` while holding
an exclusive ``flock`` on it, then renames it to ``step-NNNNNNNN/`` with its manifest. A watcher (the
uploader streaming the files while they are written) learns the outcome from that alone: committed
(this very directory, same inode, now ``step-N`` with a usable manifest), still writing (the lock is
held), or abandoned (the lock was let go without a commit: the writer died, even by SIGKILL, or its
save failed). A pause in the files' growth means nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
from pathlib import Path
from typing import Any, Literal

from gpuline.training.checkpoints import MANIFEST, check_manifest, read_manifest, step_dir_name

# The name commit_checkpoint gives its temporary directory: ".tmp-" + step_dir_name(step) + "-" + hex.
_COMMIT_DIR = re.compile(r"^\.tmp-step-(\d{8,})-[0-9a-f]+$")
_HIDDEN = ".tmp-"


def in_progress(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Directories of commits under way (or abandoned by a writer that died), oldest step first."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for child in checkpoint_dir.iterdir():
        match = _COMMIT_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


CommitState = Literal["writing", "committed", "abandoned"]


class CommitWatch:
    """One commit under way, followed from outside: its files as they appear, then how it ended.

    Holds the temporary directory open, so it keeps reading the same directory (and can tell it from
    any other) after the writer renames it to ``step-N``. Raises OSError when the directory is gone.
    """

    def __init__(self, tmp: Path) -> None:
        match = _COMMIT_DIR.match(tmp.name)
        if match is None:
            raise ValueError(f"{tmp} is not the directory of a commit under way")
        self.step = int(match.group(1))
        self.final = tmp.parent / step_dir_name(self.step)
        self._fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        self._inode = os.fstat(self._fd).st_ino

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def files(self) -> list[str]:
        """The regular files written so far at the top of the directory (not the manifest)."""
        names = []
        for name in os.listdir(self._fd):
            if name == MANIFEST or name.startswith(_HIDDEN):
                continue
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_mode):
                    names.append(name)
        return sorted(names)

    def open_file(self, name: str) -> int:
        """A read-only descriptor of the file ``name`` in this directory, whatever it is called now."""
        return os.open(name, os.O_RDONLY, dir_fd=self._fd)

    def inode_of(self, name: str) -> int:
        return os.stat(name, dir_fd=self._fd).st_ino

    def committed(self) -> dict[str, Any] | None:
        """The manifest, once this very directory has become ``step-N`` with a usable one."""
        try:
            if os.stat(self.final).st_ino != self._inode:
                return None
            manifest = read_manifest(self.final)
        except (OSError, ValueError):
            return None
        return None if check_manifest(manifest, self.step) else manifest

    def writer_at_work(self) -> bool:
        """Whether the writer still holds its lock (only meaningful once a file has appeared)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False

    def state(self) -> CommitState:
        if self.committed() is not None:
            return "committed"
        if self.writer_at_work():
            return "writing"
        # The lock was let go: after the rename (look once more), or by a writer that died.
        return "committed" if self.committed() is not None else "abandoned"
