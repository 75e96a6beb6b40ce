"""Users, API tokens, roles and login throttling (thinvisor.auth), and their CLI."""

from __future__ import annotations

import asyncio
import json
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import pytest
from argon2 import PasswordHasher
from typer.testing import CliRunner

import thinvisor.auth
from thinvisor.api.app import create_app
from thinvisor.auth import LoginThrottle, Permission, Role, UserStore, allows, permissions
from thinvisor.auth.throttle import MAX_ADDRESSES
from thinvisor.auth.users import VERIFIED_TTL_S
from thinvisor.cli import common
from thinvisor.cli.users import app
from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import AlreadyExists, InvalidArgument, InvalidConfig, NotFound
from thinvisor.host.agent import HostAgent

from .clienv import host_env

# Cheap parameters: argon2 is slow on purpose, tests need not be.
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PW = "correct horse"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "users.json"


@pytest.fixture
def store(path: Path) -> UserStore:
    return UserStore(path, hasher=FAST)


def test_public_api() -> None:
    assert sorted(thinvisor.auth.__all__) == sorted(
        [
            "TOKEN_PREFIX",
            "LoginThrottle",
            "Permission",
            "Role",
            "TokenInfo",
            "User",
            "UserStore",
            "allows",
            "permissions",
        ]
    )
    for name in thinvisor.auth.__all__:
        assert hasattr(thinvisor.auth, name)


# -- roles -----------------------------------------------------------------------------

MATRIX = {
    Role.ADMIN: {"read", "power", "console", "configure", "admin"},
    Role.OPERATOR: {"read", "power", "console"},
    Role.READ_ONLY: {"read"},
    Role.NO_ACCESS: set(),
}


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("permission", list(Permission))
def test_roles_matrix(role: Role, permission: Permission) -> None:
    assert allows(role, permission) is (permission.value in MATRIX[role])


def test_role_values() -> None:
    assert [r.value for r in Role] == ["admin", "operator", "read-only", "no-access"]
    assert permissions(Role("read-only")) == {Permission.READ}
    assert permissions(Role("no-access")) == frozenset()


# -- users -----------------------------------------------------------------------------


def test_add_get_list(store: UserStore) -> None:
    assert store.is_empty()
    assert store.users() == []
    alice = store.add_user("alice", PW, Role.ADMIN)
    store.add_user("bob", PW, "read-only")
    assert not store.is_empty()
    assert store.get("alice") == alice
    assert alice.role is Role.ADMIN
    assert alice.created.tzinfo is not None
    assert [(u.name, u.role) for u in store.users()] == [
        ("alice", Role.ADMIN),
        ("bob", Role.READ_ONLY),
    ]
    with pytest.raises(NotFound):
        store.get("carol")


@pytest.mark.parametrize(
    ("name", "password", "role", "field"),
    [
        ("a/b", PW, "admin", "name"),
        ("", PW, "admin", "name"),
        ("x" * 65, PW, "admin", "name"),
        ("carol", "short", "admin", "password"),
        ("carol", "1234567", "admin", "password"),
        ("carol", PW, "root", "role"),
    ],
)
def test_add_user_refuses_bad_input(
    store: UserStore, name: str, password: str, role: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        store.add_user(name, password, role)
    assert info.value.field == field
    assert store.is_empty()


def test_add_user_twice(store: UserStore) -> None:
    store.add_user("alice", PW, Role.ADMIN)
    with pytest.raises(AlreadyExists):
        store.add_user("alice", "another password", Role.OPERATOR)
    with pytest.raises(AlreadyExists):
        store.add_first_user("root", PW)
    assert store.get("alice").role is Role.ADMIN


def test_authenticate(store: UserStore) -> None:
    store.add_user("alice", PW, Role.OPERATOR)
    user = store.authenticate("alice", PW)
    assert user is not None
    assert user.name == "alice"
    assert store.authenticate("alice", "wrong password") is None
    assert store.authenticate("nobody", PW) is None
    assert store.authenticate("alice", "") is None


class CountingHasher(PasswordHasher):
    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verified = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.verified += 1
        return super().verify(hash, password)


def test_a_checked_password_is_remembered_for_a_minute(path: Path) -> None:
    now = [0.0]
    hasher = CountingHasher()
    store = UserStore(path, hasher=hasher, clock=lambda: now[0])
    store.add_user("alice", PW, Role.OPERATOR)
    store.add_user("bob", PW, Role.OPERATOR)
    assert store.authenticate("alice", PW) is not None
    assert store.authenticate("alice", PW) is not None
    assert hasher.verified == 1
    # Wrong passwords are always checked; the role is always the current one.
    assert store.authenticate("alice", PW + "x") is None
    assert hasher.verified == 2
    store.set_role("alice", Role.ADMIN)
    user = store.authenticate("alice", PW)
    assert user is not None and user.role == Role.ADMIN
    assert hasher.verified == 2
    now[0] += VERIFIED_TTL_S + 1
    assert store.authenticate("alice", PW) is not None
    assert hasher.verified == 3
    # A new password or a removed user counts at once.
    store.set_password("alice", "a new password")
    assert store.authenticate("alice", PW) is None
    assert store.authenticate("bob", PW) is not None
    store.remove_user("bob")
    assert store.authenticate("bob", PW) is None


def test_set_password(store: UserStore) -> None:
    store.add_user("alice", PW, Role.OPERATOR)
    with pytest.raises(InvalidArgument):
        store.set_password("alice", "short")
    store.set_password("alice", "a new password")
    assert store.authenticate("alice", PW) is None
    assert store.authenticate("alice", "a new password") is not None
    with pytest.raises(NotFound):
        store.set_password("nobody", "a new password")


def test_login_upgrades_old_hashes(path: Path, store: UserStore) -> None:
    store.add_user("alice", PW, Role.OPERATOR)
    assert "m=8," in path.read_text()
    default = UserStore(path)  # default argon2 parameters
    assert default.authenticate("alice", PW) is not None
    stored = json.loads(path.read_text())["users"]["alice"]["password_hash"]
    assert not PasswordHasher().check_needs_rehash(stored)
    assert default.authenticate("alice", PW) is not None


def test_roles_and_the_last_admin(store: UserStore) -> None:
    store.add_user("alice", PW, Role.ADMIN)
    store.add_user("bob", PW, Role.OPERATOR)
    with pytest.raises(InvalidArgument):
        store.set_role("alice", Role.OPERATOR)
    with pytest.raises(InvalidArgument):
        store.remove_user("alice")
    assert store.set_role("bob", "admin").role is Role.ADMIN
    assert store.set_role("alice", Role.READ_ONLY).role is Role.READ_ONLY
    with pytest.raises(InvalidArgument) as refused:
        store.set_role("bob", "superuser")
    assert refused.value.field == "role"
    assert str(refused.value) == "role: must be one of admin, operator, read-only, no-access"
    # The last admin may not be suspended either.
    with pytest.raises(InvalidArgument):
        store.set_role("bob", Role.NO_ACCESS)
    store.remove_user("alice")
    assert [u.name for u in store.users()] == ["bob"]
    with pytest.raises(NotFound):
        store.remove_user("alice")


def test_file_is_private(path: Path, store: UserStore) -> None:
    store.add_user("alice", PW, Role.ADMIN)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lock = path.with_name("users.json.lock")
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert PW not in path.read_text()


def test_two_stores_see_each_others_changes(path: Path, store: UserStore) -> None:
    other = UserStore(path, hasher=FAST)
    assert other.is_empty()
    store.add_user("alice", PW, Role.ADMIN)
    assert [u.name for u in other.users()] == ["alice"]
    _, token = other.create_token("alice", "ci")
    assert store.user_for_token(token) is not None
    other.add_user("bob", PW, Role.OPERATOR)
    store.set_role("bob", Role.READ_ONLY)
    assert other.get("bob").role is Role.READ_ONLY
    assert store.authenticate("bob", PW) is not None


def test_concurrent_updates_are_not_lost(path: Path, store: UserStore) -> None:
    store.add_user("alice", PW, Role.ADMIN)

    def make_tokens() -> None:
        own = UserStore(path, hasher=FAST)
        for i in range(20):
            own.create_token("alice", f"t{i}")

    threads = [threading.Thread(target=make_tokens) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.tokens()) == 60


def test_corrupt_file(path: Path, store: UserStore) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(InvalidConfig, match="corrupt"):
        store.users()
    path.write_text(json.dumps({"version": 1, "users": {"a": {"role": "god"}}}))
    with pytest.raises(InvalidConfig, match=r"users\.a"):
        store.authenticate("a", PW)


# -- tokens ----------------------------------------------------------------------------


def test_tokens(path: Path, store: UserStore) -> None:
    store.add_user("alice", PW, Role.ADMIN)
    store.add_user("bob", PW, Role.READ_ONLY)
    info, token = store.create_token("bob", "backup script")
    assert token.startswith("tv_")
    assert len(token) > 40
    assert token not in path.read_text()
    assert info.owner == "bob"
    assert info.label == "backup script"
    assert len(info.id) == 8
    user = store.user_for_token(token)
    assert user is not None
    assert (user.name, user.role) == ("bob", Role.READ_ONLY)
    assert store.user_for_token(token + "x") is None
    assert store.user_for_token(token[3:]) is None
    assert store.user_for_token("") is None

    info2, _ = store.create_token("alice")
    assert store.tokens() == [info, info2]
    assert store.tokens("alice") == [info2]
    with pytest.raises(NotFound):
        store.tokens("nobody")
    with pytest.raises(NotFound):
        store.create_token("nobody")
    with pytest.raises(InvalidArgument):
        store.create_token("bob", "x" * 101)


def test_revoke_token(store: UserStore) -> None:
    store.add_user("alice", PW, Role.ADMIN)
    store.add_user("bob", PW, Role.OPERATOR)
    info, token = store.create_token("bob")
    with pytest.raises(NotFound):
        store.revoke_token(info.id, owner="alice")
    assert store.revoke_token(info.id, owner="bob") == info
    assert store.user_for_token(token) is None
    with pytest.raises(NotFound):
        store.revoke_token(info.id)
    with pytest.raises(NotFound):
        store.revoke_token("")


def test_removing_a_user_revokes_its_tokens(store: UserStore) -> None:
    store.add_user("alice", PW, Role.ADMIN)
    store.add_user("bob", PW, Role.OPERATOR)
    _, token = store.create_token("bob")
    store.remove_user("bob")
    assert store.user_for_token(token) is None
    assert store.tokens() == []


# -- throttle --------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_backs_off() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock=clock)
    addr = "192.0.2.1"
    for _ in range(2):
        throttle.failed(addr)
        assert throttle.delay(addr) == 0
    throttle.failed(addr)  # the third failure
    assert throttle.delay(addr) == 1
    clock.now += 0.25
    assert throttle.delay(addr) == 0.75
    clock.now += 1
    assert throttle.delay(addr) == 0
    expected = [2, 4, 8, 16, 32, 60, 60]
    for wait in expected:
        throttle.failed(addr)
        assert throttle.delay(addr) == wait
    assert throttle.delay("192.0.2.2") == 0


def test_throttle_success_clears() -> None:
    throttle = LoginThrottle(clock=FakeClock())
    for _ in range(5):
        throttle.failed("192.0.2.1")
    assert throttle.delay("192.0.2.1") > 0
    throttle.succeeded("192.0.2.1")
    assert throttle.delay("192.0.2.1") == 0


def test_throttle_forgets_old_failures() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock=clock)
    throttle.failed("192.0.2.1")
    throttle.failed("192.0.2.1")
    clock.now += 601
    throttle.failed("192.0.2.1")
    assert throttle.delay("192.0.2.1") == 0
    clock.now += 601
    assert throttle.delay("192.0.2.1") == 0
    assert len(throttle) == 0


def test_throttle_ipv6_counts_per_64() -> None:
    throttle = LoginThrottle(clock=FakeClock())
    for i in range(3):
        throttle.failed(f"2001:db8::{i + 1}")
    assert throttle.delay("2001:db8::ffff") == 1
    assert throttle.delay("2001:db8:0:1::1") == 0
    for _ in range(3):
        throttle.failed("::ffff:192.0.2.7")
    assert throttle.delay("192.0.2.7") == 1


def test_throttle_memory_is_bounded() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock=clock)
    for _ in range(3):
        throttle.failed("first")
    for i in range(MAX_ADDRESSES):
        throttle.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert len(throttle) == MAX_ADDRESSES
    assert throttle.delay("first") == 0  # the oldest was dropped


# -- a suspended account on a host -----------------------------------------------------

#: The host's routes that need no permission: liveness, and trading a password for a token.
# What a no-access user may still do: probe health, log in, ask who they are.
OPEN_ROUTES = {"/api/v1/health", "/api/v1/auth/login", "/api/v1/auth/whoami"}


def test_a_no_access_user_logs_in_to_a_host_but_may_do_nothing(tmp_path: Path) -> None:
    config = HostConfig(
        state_dir=tmp_path / "state",
        run_dir=tmp_path / "run",
        cache_dir=tmp_path / "cache",
        datastores=[DatastoreConfig(name="local", path=tmp_path / "local")],
    )
    agent = HostAgent(config)
    agent.users = agent.gate.users = UserStore(config.state_dir / "users.json", hasher=FAST)
    agent.users.add_user("idle", PW, Role.NO_ACCESS)
    app = create_app(agent, start_agent=False)

    async def sweep() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://host") as client:
            assert (await client.get("/api/v1/health")).status_code == 200
            login = await client.post("/api/v1/auth/login", json={"user": "idle", "password": PW})
            assert login.status_code == 200 and login.json()["role"] == "no-access"
            headers = {"Authorization": f"Bearer {login.json()['token']}"}
            whoami = await client.get("/api/v1/auth/whoami", headers=headers)
            assert whoami.json() == {"user": "idle", "role": "no-access"}
            routes = [
                (method, path)
                for path, operations in app.openapi()["paths"].items()
                for method in operations
                if path not in OPEN_ROUTES
            ]
            for method, path in [*routes, ("get", "/metrics")]:
                url = re.sub(r"\{[^}]+\}", "x", path)
                answer = await client.request(method, url, headers=headers)
                assert answer.status_code == 403, (method, path, answer.text)
                assert answer.json()["message"].startswith("role no-access may not ")
            return len(routes)

    try:
        assert asyncio.run(sweep()) > 30  # every route of the host API was asked
    finally:
        agent.events.close()


# -- CLI -------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    common.set_config_path(None)  # forget a configuration another test loaded
    yield host_env(tmp_path)
    common.set_config_path(None)


def tv(env: dict[str, str], *args: str, code: int = 0, stdin: str | None = None) -> str:
    result = CliRunner().invoke(app, list(args), env=env, input=stdin)
    assert result.exit_code == code, result.output
    return result.stderr if code else result.stdout


def test_cli_users(tmp_path: Path, env: dict[str, str]) -> None:
    pwfile = tmp_path / "pw"
    pwfile.write_text(f"{PW}\nignored\n")
    out = tv(env, "init", "--password-file", str(pwfile))
    assert out.startswith("created admin user 'admin'")
    users_json = tmp_path / "state" / "users.json"
    assert stat.S_IMODE(users_json.stat().st_mode) == 0o600
    err = tv(env, "init", "--password-file", str(pwfile), code=1)
    assert err.startswith("error: users already exist")
    assert err.count("\n") == 1

    tv(env, "user", "add", "bob", "--role", "operator", "--password-file", "-", stdin=PW + "\n")
    err = tv(env, "user", "add", "bob", "--role", "operator", code=1)
    assert err == "error: user 'bob' already exists\n"
    err = tv(env, "user", "add", "a/b", "--role", "operator", code=1)
    assert err == "error: name: must not contain '/' or '..'\n"
    tv(env, "user", "add", "carol", "--role", "root", code=2)
    short = tmp_path / "short"
    short.write_text("abc\n")
    err = tv(
        env, "user", "add", "carol", "--role", "read-only", "--password-file", str(short), code=1
    )
    assert err == "error: password: must be at least 8 characters\n"

    listed = json.loads(tv(env, "user", "list", "--json"))
    assert [(u["name"], u["role"]) for u in listed] == [("admin", "admin"), ("bob", "operator")]
    assert "operator" in tv(env, "user", "list")

    # The prompt asks twice.
    tv(env, "user", "passwd", "bob", stdin="a new password\na new password\n")
    store = UserStore(users_json, hasher=FAST)
    assert store.authenticate("bob", "a new password") is not None
    tv(env, "user", "passwd", "nobody", code=1)
    tv(env, "user", "role", "bob", "read-only")
    assert store.get("bob").role is Role.READ_ONLY
    tv(env, "user", "role", "bob", "no-access")  # suspended: may log in, nothing more
    assert store.get("bob").role is Role.NO_ACCESS
    assert "no-access" in tv(env, "user", "add", "--help")
    err = tv(env, "user", "remove", "admin", code=1)
    assert err == "error: name: cannot remove the last admin\n"
    tv(env, "user", "remove", "bob")
    assert [u.name for u in store.users()] == ["admin"]


def test_cli_init_prompts(tmp_path: Path, env: dict[str, str]) -> None:
    tv(env, "init", "--user", "root", stdin=f"{PW}\n{PW}\n")
    assert UserStore(tmp_path / "state" / "users.json").get("root").role is Role.ADMIN


def test_cli_tokens(tmp_path: Path, env: dict[str, str]) -> None:
    store = UserStore(tmp_path / "state" / "users.json", hasher=FAST)
    store.add_user("alice", PW, Role.ADMIN)
    result = CliRunner().invoke(app, ["token", "create", "alice", "--label", "ci"], env=env)
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert token.startswith("tv_")
    assert "not shown again" in result.stderr
    user = store.user_for_token(token)
    assert user is not None
    assert user.name == "alice"

    listed = json.loads(tv(env, "token", "list", "--json"))
    assert [(t["owner"], t["label"]) for t in listed] == [("alice", "ci")]
    assert token not in tv(env, "token", "list", "--user", "alice")
    tv(env, "token", "create", "nobody", code=1)
    tv(env, "token", "revoke", listed[0]["id"])
    assert store.user_for_token(token) is None
    assert tv(env, "token", "revoke", listed[0]["id"], code=1).startswith("error: token ")
