"""``make demo``: start the host agent, then create, start and watch the VM ``demo``
through its REST API, as any client would.

Run again, it reuses what is there: the appliance cache, the agent, the user, the VM.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

from thinvisor.api.server import prepare_tls
from thinvisor.appliance import build_appliance
from thinvisor.auth import Role, UserStore
from thinvisor.config import HostConfig, config_path, load_config
from thinvisor.errors import ThinvisorError
from thinvisor.fs import atomic_write

NAME = "demo"
DEMO_USER = "demo"
READY = re.compile(rb"THINVISOR-APPLIANCE-READY uptime=([0-9.]+)")
# Terminal control sequences (the guest shell asks the terminal for its size).
CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CREDENTIALS = Path.home() / ".config" / "thinvisor" / "demo-credentials"
# The demo's VM networking lives in a network namespace of its own, so that trying
# thinvisor changes nothing in the machine's own network (no bridge, address or
# nftables rule appears there); a real host leaves [network] namespace unset.
DEMO_NAMESPACE = "thinvisor-demo"
NAT_SWITCH = "default"
NAT_ADDRESS = "10.47.0.1/24"


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def credentials(config: HostConfig) -> tuple[str, str]:
    """The demo admin's name and password, made (or renewed) when needed."""
    users = UserStore(config.state_dir / "users.json")
    if CREDENTIALS.exists():
        user, _, password = CREDENTIALS.read_text().strip().partition(":")
        if users.authenticate(user, password) is not None:
            return user, password
    password = secrets.token_urlsafe(18)
    if any(u.name == DEMO_USER for u in users.users()):
        users.set_password(DEMO_USER, password)
    else:
        users.add_user(DEMO_USER, password, Role.ADMIN)
    CREDENTIALS.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(CREDENTIALS, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{DEMO_USER}:{password}\n")
    os.chmod(CREDENTIALS, 0o600)
    say(f"created the admin user {DEMO_USER!r}; credentials in {CREDENTIALS}")
    return DEMO_USER, password


def demo_config() -> HostConfig:
    """The host's configuration; on a machine that has none, one that keeps the VMs'
    networking in the demo's own network namespace (written to the default path)."""
    path = config_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(
            path,
            "# Written by `make demo`: the VMs' networking (switches, TAPs, dnsmasq) lives\n"
            "# in this network namespace, away from the machine's own network. Remove the\n"
            "# [network] table to run VM networks in the host's namespace.\n"
            f'[network]\nnamespace = "{DEMO_NAMESPACE}"\n',
        )
        say(f"wrote {path}: VM networking in the network namespace {DEMO_NAMESPACE!r}")
    return load_config()


def ensure_nat_switch(client: httpx.Client) -> None:
    """The NAT switch ``default`` with its port group, as libvirt's default network."""
    if client.get(f"/networks/switches/{NAT_SWITCH}").status_code == 200:
        return
    say(f"creating the NAT switch {NAT_SWITCH!r} ({NAT_ADDRESS}, DHCP and DNS by dnsmasq)")
    body = {
        "name": NAT_SWITCH,
        "nat": {"address": NAT_ADDRESS},
        "port_groups": [{"name": NAT_SWITCH}],
    }
    response = client.post("/networks/switches", json=body)
    if response.status_code != 201:
        raise ThinvisorError(f"{response.status_code}: {response.text}")


def wait_address(client: httpx.Client) -> str | None:
    """The address the VM's first NIC leased from the NAT switch's DHCP server."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        nics = client.get(f"/vms/{NAME}/nics").json()
        if nics and nics[0].get("ip"):
            return str(nics[0]["ip"])
        time.sleep(0.5)
    return None


def ensure_agent(config: HostConfig, base: str, cert: Path) -> None:
    """Start ``thinvisor host serve`` in the background unless it already answers."""
    if _healthy(base, cert):
        say(f"the host agent already answers at {base}")
        return
    log = config.state_dir / "agent.log"
    thinvisor = str(Path(sys.executable).with_name("thinvisor"))
    with log.open("ab") as out:
        subprocess.Popen(
            [thinvisor, "host", "serve"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while not _healthy(base, cert):
        if time.monotonic() > deadline:
            raise ThinvisorError(f"the host agent did not come up; see {log}")
        time.sleep(0.2)
    say(f"started the host agent at {base} (log: {log})")


def _healthy(base: str, cert: Path) -> bool:
    try:
        context = ssl.create_default_context(cafile=str(cert))
        return httpx.get(f"{base}/health", verify=context, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_task(client: httpx.Client, response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 202:
        raise ThinvisorError(f"{response.status_code}: {response.text}")
    url = response.headers["Location"].removeprefix("/api/v1")
    while True:
        task: dict[str, Any] = client.get(url).json()
        if task["state"] == "success":
            return task
        if task["state"] == "error":
            raise ThinvisorError(task["error"]["message"])
        time.sleep(0.2)


def ensure_vm(client: httpx.Client) -> dict[str, Any]:
    found = client.get(f"/vms/{NAME}")
    if found.status_code == 200:
        vm: dict[str, Any] = found.json()
        return on_nat_switch(client, vm)
    say(f"creating VM {NAME!r} through POST /api/v1/vms")
    body = {
        "name": NAME,
        "memory_mib": 128,
        "appliance": True,
        "cdrom": {},
        "nics": [{"network": NAT_SWITCH}],
        "disks": [{"size": 1 << 30}],
    }
    result: dict[str, Any] = wait_task(client, client.post("/vms", json=body))["result"]
    return result


def on_nat_switch(client: httpx.Client, vm: dict[str, Any]) -> dict[str, Any]:
    """A demo VM from an older thinvisor (user networking) moves to the NAT switch."""
    nics = client.get(f"/vms/{NAME}/nics").json()
    if not nics or nics[0]["network"] == NAT_SWITCH:
        return vm
    if vm["state"] != "stopped":
        say(f"powering off VM {NAME!r} to move its NIC to the NAT switch {NAT_SWITCH!r}")
        client.post(f"/vms/{NAME}/stop").raise_for_status()
    moved = client.patch(f"/vms/{NAME}/nics/{nics[0]['name']}", json={"network": NAT_SWITCH})
    moved.raise_for_status()
    updated: dict[str, Any] = client.get(f"/vms/{NAME}").json()
    return updated


def console_until_ready(port: int, cert: Path, user: str, password: str) -> str:
    """The serial console, over the agent's WebSocket, until the appliance is ready."""
    context = ssl.create_default_context(cafile=str(cert))
    url = f"wss://127.0.0.1:{port}/api/v1/vms/{NAME}/console/serial"
    seen = b""
    auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    with connect(url, ssl=context, additional_headers={"Authorization": auth}) as conn:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            # Once the ready line is in, stop when the console has been quiet for a second.
            quiet = 1.0 if READY.search(seen) else deadline - time.monotonic()
            try:
                msg = conn.recv(timeout=max(0.1, quiet))
            except TimeoutError:
                if READY.search(seen):
                    break
                continue
            seen += msg if isinstance(msg, bytes) else msg.encode()
        else:
            raise ThinvisorError("the demo VM did not print its ready line within 120 s")
    return CONTROL.sub("", seen.decode(errors="replace"))


def demo() -> None:
    config = demo_config()
    say("building the quick-start appliance (cached after the first run)")
    build_appliance(config.cache_dir, progress=lambda m: say(f"  {m}"))
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert, _, fingerprint = prepare_tls(config)
    port = config.api.port
    base = f"https://127.0.0.1:{port}/api/v1"
    user, password = credentials(config)
    ensure_agent(config, base, cert)
    context = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(base_url=base, verify=context, auth=(user, password), timeout=120) as c:
        ensure_nat_switch(c)
        vm = ensure_vm(c)
        if vm["state"] in ("stopped", "suspended"):
            say(f"starting VM {NAME!r} through POST /api/v1/vms/{NAME}/start")
            c.post(f"/vms/{NAME}/start").raise_for_status()
        elif vm["state"] == "paused":
            wait_task(c, c.post(f"/vms/{NAME}/resume"))
        console = console_until_ready(port, cert, user, password)
        vm = c.get(f"/vms/{NAME}").json()
        address = wait_address(c)
    say(
        f"\nVM {NAME!r} is {vm['state']} (pid {vm['pid']}). Its serial console, read over the "
        "API's WebSocket, said:\n"
    )
    for line in console.splitlines()[-12:]:
        say(f"  | {line.rstrip()}")
    if address:
        say(f"\nIts NIC leased {address} from the NAT switch {NAT_SWITCH!r} ({NAT_ADDRESS}).")
    else:
        say(f"\nIts NIC has no DHCP lease from the NAT switch {NAT_SWITCH!r} yet.")
    say(
        f"\nThe host agent runs at {base} (TLS certificate SHA-256 {fingerprint}).\n"
        f"Next:\n"
        f"  curl --cacert {cert} -u $(cat {CREDENTIALS}) {base}/vms\n"
        f"  .venv/bin/thinvisor vm console {NAME}      # attach; detach with Ctrl-]\n"
        f"  .venv/bin/thinvisor vm shutdown {NAME}     # ACPI; 'vm stop' pulls the plug\n"
        f"  .venv/bin/thinvisor vm delete {NAME}\n"
        f"  .venv/bin/thinvisor network switch show {NAT_SWITCH}   # ports, DHCP leases\n"
        f"  .venv/bin/thinvisor vm nic list {NAME}\n"
        f"  the OpenAPI schema: {base}/openapi.json, browsable at {base}/docs\n"
        f"  CIM: .venv-tools/bin/pywbemcli -s https://127.0.0.1:{config.cim.port} "
        f"--ca-certs {cert} -u {user} -p ... profile list\n"
    )


def main() -> int:
    try:
        demo()
    except (ThinvisorError, httpx.HTTPError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
