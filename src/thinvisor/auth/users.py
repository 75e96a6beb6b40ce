"""Users, their passwords and their API tokens: one JSON file shared by the CLI and the agent.

The file (``<state_dir>/users.json``, mode 0600) holds argon2id password hashes and the
SHA-256 hashes of API tokens, never a token itself. Every change takes an exclusive
``fcntl`` lock on ``users.json.lock`` next to it, re-reads the file and replaces it
atomically, so that two processes never lose each other's updates. Reads take no lock
(the file is always whole); each call reads the file again, and parses it again only when
its bytes changed.

Hashing is slow on purpose (about 0.1 s); an async caller runs these methods in a thread.
A password checked successfully is remembered for a minute (as a keyed hash, in memory
only), so that clients that send HTTP Basic with every request (CIM clients do) do not
pay that time each time; a changed password or a removed user is noticed at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import Field, ValidationError

from thinvisor.auth.roles import Role
from thinvisor.errors import AlreadyExists, InvalidArgument, InvalidConfig, NotFound
from thinvisor.fs import atomic_write, file_lock
from thinvisor.model.base import StrictModel
from thinvisor.model.vm import check_name

TOKEN_PREFIX = "tv_"
PASSWORD_MIN = 8
PASSWORD_MAX = 1024
LABEL_MAX = 100
_TOKEN_ID_LEN = 8
VERIFIED_TTL_S = 60.0
_VERIFIED_MAX = 1024

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    created: datetime

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "role": str(self.role), "created": self.created.isoformat()}


@dataclass(frozen=True)
class TokenInfo:
    """An API token as it may be shown: never the token itself."""

    id: str
    owner: str
    label: str
    created: datetime

    def to_dict(self) -> dict[str, str]:
        return {
            "id": self.id,
            "owner": self.owner,
            "label": self.label,
            "created": self.created.isoformat(),
        }


class _UserRecord(StrictModel):
    role: Role
    password_hash: str
    created: datetime


class _TokenRecord(StrictModel):
    owner: str
    label: str
    created: datetime


class _UsersFile(StrictModel):
    version: Literal[1] = 1
    users: dict[str, _UserRecord] = Field(default_factory=dict)
    # Keyed by the hex SHA-256 of the token.
    tokens: dict[str, _TokenRecord] = Field(default_factory=dict)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_user_name(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as exc:
        raise InvalidArgument("name", str(exc)) from None


def _check_password(password: str) -> str:
    if len(password) < PASSWORD_MIN:
        raise InvalidArgument("password", f"must be at least {PASSWORD_MIN} characters")
    if len(password) > PASSWORD_MAX:
        raise InvalidArgument("password", f"must be at most {PASSWORD_MAX} characters")
    return password


def _check_role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise InvalidArgument("role", f"must be one of {choices}") from None


def _check_label(label: str) -> str:
    if len(label) > LABEL_MAX:
        raise InvalidArgument("label", f"must be at most {LABEL_MAX} characters")
    if not label.isprintable():
        raise InvalidArgument("label", "must be printable text")
    return label


class UserStore:
    """The users and API tokens kept in one JSON file."""

    def __init__(
        self,
        path: Path,
        hasher: PasswordHasher | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")
        # Tests pass a cheap hasher; hashes made with other parameters are upgraded on login.
        self._hasher = hasher or PasswordHasher()
        self._cache: tuple[bytes, _UsersFile] | None = None
        self._dummy_hash: str | None = None
        self._clock = clock
        self._verified: dict[bytes, float] = {}  # proof of a checked password: its expiry
        self._verified_key = secrets.token_bytes(32)

    # -- users -------------------------------------------------------------------------

    def is_empty(self) -> bool:
        """Whether no user exists yet (a fresh host)."""
        return not self._read().users

    def users(self) -> list[User]:
        """All users, by name."""
        data = self._read()
        return [_user(name, rec) for name, rec in sorted(data.users.items())]

    def get(self, name: str) -> User:
        """One user; ``NotFound`` when there is none by that name."""
        return _user(name, _record(self._read(), name))

    def add_user(self, name: str, password: str, role: Role | str) -> User:
        """Add a user; ``AlreadyExists`` when the name is taken."""
        return self._add(name, password, role, first=False)

    def add_first_user(self, name: str, password: str) -> User:
        """Add an admin, but only to an empty store (``AlreadyExists`` otherwise)."""
        return self._add(name, password, Role.ADMIN, first=True)

    def remove_user(self, name: str) -> None:
        """Remove a user and its tokens; the last admin cannot be removed."""
        with self._update() as data:
            rec = _record(data, name)
            if rec.role == Role.ADMIN:
                _refuse_last_admin(data, name, "name", "cannot remove the last admin")
            del data.users[name]
            data.tokens = {h: t for h, t in data.tokens.items() if t.owner != name}

    def set_password(self, name: str, password: str) -> None:
        """Give a user a new password; its tokens stay valid."""
        hashed = self._hasher.hash(_check_password(password))
        with self._update() as data:
            _record(data, name).password_hash = hashed

    def set_role(self, name: str, role: Role | str) -> User:
        """Change a user's role; the last admin cannot lose it."""
        new_role = _check_role(role)
        with self._update() as data:
            rec = _record(data, name)
            if rec.role == Role.ADMIN and new_role != Role.ADMIN:
                _refuse_last_admin(data, name, "role", "the last admin must stay admin")
            rec.role = new_role
            return _user(name, rec)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when ``password`` is theirs, else None; unknown names cost the same time."""
        rec = self._read().users.get(name)
        if rec is None:
            self._verify(self._dummy(), password)
            return None
        # The stored hash is part of the proof: a new password invalidates it.
        proof = self._proof(name, rec.password_hash, password)
        if self._verified.get(proof, 0.0) > self._clock():
            return _user(name, rec)
        if not self._verify(rec.password_hash, password):
            return None
        if self._hasher.check_needs_rehash(rec.password_hash):
            self._rehash(name, rec.password_hash, password)
        else:
            self._remember(proof)
        return _user(name, rec)

    # -- tokens ------------------------------------------------------------------------

    def create_token(self, name: str, label: str = "") -> tuple[TokenInfo, str]:
        """A new API token for user ``name``: its description and, this once, the token."""
        label = _check_label(label)
        with self._update() as data:
            _record(data, name)
            ids = {h[:_TOKEN_ID_LEN] for h in data.tokens}
            while True:
                token = TOKEN_PREFIX + secrets.token_urlsafe(32)
                hashed = _token_hash(token)
                if hashed[:_TOKEN_ID_LEN] not in ids:
                    break
            rec = _TokenRecord(owner=name, label=label, created=_now())
            data.tokens[hashed] = rec
            return _token(hashed, rec), token

    def tokens(self, name: str | None = None) -> list[TokenInfo]:
        """Every token, or those of user ``name``, oldest first."""
        data = self._read()
        if name is not None:
            _record(data, name)
        found = [_token(h, t) for h, t in data.tokens.items() if name in (None, t.owner)]
        return sorted(found, key=lambda t: t.created)

    def revoke_token(self, token_id: str, owner: str | None = None) -> TokenInfo:
        """Delete a token so that it no longer authenticates.

        With ``owner``, only a token of that user is found: a user revoking its own token.
        """
        with self._update() as data:
            key = _token_key(data, token_id)
            if owner is not None and data.tokens[key].owner != owner:
                raise NotFound(f"token {token_id!r} does not exist")
            return _token(key, data.tokens.pop(key))

    def user_for_token(self, token: str) -> User | None:
        """The user a token belongs to, or None when it is not a valid token."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        data = self._read()
        rec = data.tokens.get(_token_hash(token))
        if rec is None or rec.owner not in data.users:
            return None
        return _user(rec.owner, data.users[rec.owner])

    # -- internals ---------------------------------------------------------------------

    def _add(self, name: str, password: str, role: Role | str, first: bool) -> User:
        name = _check_user_name(name)
        new_role = _check_role(role)
        hashed = self._hasher.hash(_check_password(password))
        with self._update() as data:
            if first and data.users:
                raise AlreadyExists(f"users already exist in {self.path}")
            if name in data.users:
                raise AlreadyExists(f"user {name!r} already exists")
            rec = _UserRecord(role=new_role, password_hash=hashed, created=_now())
            data.users[name] = rec
            return _user(name, rec)

    def _proof(self, name: str, hashed: str, password: str) -> bytes:
        message = "\0".join((name, hashed, password)).encode()
        return hmac.new(self._verified_key, message, hashlib.sha256).digest()

    def _remember(self, proof: bytes) -> None:
        now = self._clock()
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified = {p: t for p, t in self._verified.items() if t > now}
            if len(self._verified) >= _VERIFIED_MAX:
                self._verified = {}
        self._verified[proof] = now + VERIFIED_TTL_S

    def _verify(self, hashed: str, password: str) -> bool:
        try:
            return self._hasher.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return False

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        return self._dummy_hash

    def _rehash(self, name: str, old_hash: str, password: str) -> None:
        new_hash = self._hasher.hash(password)
        try:
            with self._update() as data:
                rec = data.users.get(name)
                # Someone may have changed the password meanwhile; theirs wins.
                if rec is not None and rec.password_hash == old_hash:
                    rec.password_hash = new_hash
        except OSError as exc:
            # The login itself succeeded; the upgrade waits for the next one.
            log.warning("cannot upgrade the password hash of %r: %s", name, exc)

    def _read(self) -> _UsersFile:
        # Comparing bytes, not mtimes: two writes within one clock tick share an mtime.
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return _UsersFile()
        except OSError as exc:
            raise InvalidConfig(f"users: cannot read {self.path}: {exc.strerror}") from exc
        cached = self._cache
        if cached is not None and cached[0] == raw:
            return cached[1]
        data = self._parse(raw)
        self._cache = (raw, data)
        return data

    def _parse(self, raw: bytes) -> _UsersFile:
        try:
            return _UsersFile.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "file"
            msg = f"users: {self.path} is corrupt: {where}: {first['msg']}"
            raise InvalidConfig(msg) from None

    @contextmanager
    def _update(self) -> Iterator[_UsersFile]:
        """Lock, read a private copy, let the caller change it, write it back."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self._lock_path):
            data = self._read().model_copy(deep=True)
            yield data
            atomic_write(self.path, data.model_dump_json(indent=2) + "\n", mode=0o600)


def _user(name: str, rec: _UserRecord) -> User:
    return User(name=name, role=rec.role, created=rec.created)


def _token(hashed: str, rec: _TokenRecord) -> TokenInfo:
    return TokenInfo(
        id=hashed[:_TOKEN_ID_LEN], owner=rec.owner, label=rec.label, created=rec.created
    )


def _record(data: _UsersFile, name: str) -> _UserRecord:
    rec = data.users.get(name)
    if rec is None:
        raise NotFound(f"user {name!r} does not exist")
    return rec


def _token_key(data: _UsersFile, token_id: str) -> str:
    if len(token_id) == _TOKEN_ID_LEN:
        for hashed in data.tokens:
            if hashed.startswith(token_id.lower()):
                return hashed
    raise NotFound(f"token {token_id!r} does not exist")


def _refuse_last_admin(data: _UsersFile, name: str, field: str, reason: str) -> None:
    others = [n for n, r in data.users.items() if n != name and r.role == Role.ADMIN]
    if not others:
        raise InvalidArgument(field, reason)
