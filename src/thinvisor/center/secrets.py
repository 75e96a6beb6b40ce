"""Host passwords at rest: sealed with a key kept in a file beside the center's state.

The inventory database holds only sealed secrets (Fernet: AES-128-CBC with an HMAC), so a
copy of the database alone, a dump or a backup, gives no host password away. The key is
made on first use, written to ``<state_dir>/secret.key`` with mode 0600.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from thinvisor.errors import InvalidConfig
from thinvisor.fs import fsync_dir


class SecretBox:
    """Seals and opens short secrets with the key in ``key_file`` (made when missing)."""

    def __init__(self, key_file: Path) -> None:
        self.key_file = key_file
        self._fernet: Fernet | None = None
        self._lock = threading.Lock()

    def seal(self, secret: str) -> str:
        """``secret`` encrypted and authenticated, as ASCII text for a database column."""
        return self._box().encrypt(secret.encode()).decode("ascii")

    def open(self, sealed: str) -> str:
        """The secret that ``seal`` sealed; ``InvalidConfig`` if this key did not seal it."""
        try:
            return self._box().decrypt(sealed.encode("ascii")).decode()
        except (InvalidToken, UnicodeError) as exc:
            raise InvalidConfig(
                f"secrets: a stored secret cannot be opened with {self.key_file}"
                " (the key file was replaced?); enter the host's password again"
            ) from exc

    def _box(self) -> Fernet:
        with self._lock:
            if self._fernet is None:
                self._fernet = Fernet(_load_or_create(self.key_file))
            return self._fernet


def _load_or_create(path: Path) -> bytes:
    """The key in ``path``, made first if there is none."""
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _publish(path, Fernet.generate_key())
    # Another process may have won the race: the key in the file is the one to use.
    return _read_key(path)


def _publish(path: Path, key: bytes) -> None:
    """Write ``key`` to ``path`` unless a key is already there, never half written.

    A hard link of a complete temporary file appears atomically and fails if ``path``
    exists: a key that sealed secrets is never replaced by a second process's new one.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(key + b"\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)


def _read_key(path: Path) -> bytes:
    try:
        key = path.read_bytes().strip()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise InvalidConfig(f"secrets: cannot read {path}: {exc.strerror}") from exc
    try:
        Fernet(key)
    except ValueError:
        raise InvalidConfig(f"secrets: {path} does not hold a key") from None
    return key
