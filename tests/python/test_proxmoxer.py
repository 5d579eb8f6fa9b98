"""pve-sim driven by proxmoxer, a client that real Proxmox users use and nobody here wrote.

Starts the `pve-sim` binary (PVE_SIM_BIN, default target/debug/pve-sim) on a free port with
the shipped cluster file, then logs in with a ticket and with the demo API token, clones the
linux template, waits with Tasks.blocking_status, reads the config, and checks that a 4xx
and a 5xx error message reach proxmoxer's exception.
"""

import os
import pathlib
import subprocess

import pytest
from proxmoxer import ProxmoxAPI
from proxmoxer.core import AuthenticationError, ResourceException
from proxmoxer.tools import Tasks

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKEN_SECRET = "a3058775-b2df-4b2b-9997-bdc0e3d45c01"  # demo only, from data/sim/cluster.yml


@pytest.fixture(scope="module")
def sim():
    binary = os.environ.get("PVE_SIM_BIN", str(ROOT / "target" / "debug" / "pve-sim"))
    proc = subprocess.Popen(
        [binary, "--cluster", str(ROOT / "data/sim/cluster.yml"), "--listen", "127.0.0.1:0",
         "--time-scale", "0.01"],
        stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline().strip()
        second = proc.stdout.readline().strip()
        assert first.startswith("pve-sim listening on https://127.0.0.1:"), first
        assert second.startswith("fingerprint "), second
        port = int(first.rsplit(":", 1)[1])
        yield {"port": port, "fingerprint": second.split(" ", 1)[1]}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def ticket_api(sim):
    return ProxmoxAPI("127.0.0.1", port=sim["port"], user="root@pam", password="labfleet",
                      verify_ssl=False)


def token_api(sim):
    return ProxmoxAPI("127.0.0.1", port=sim["port"], user="root@pam", token_name="labfleet",
                      token_value=TOKEN_SECRET, verify_ssl=False)


def test_ticket_login_clone_wait_and_config(sim):
    pve = ticket_api(sim)
    assert len(pve.nodes.get()) == 3
    newid = int(pve.cluster.nextid.get())
    upid = pve.nodes("pve1").qemu(100).clone.post(newid=newid, name="py-web1")
    assert upid.startswith("UPID:pve1:") and ":qmclone:100:root@pam:" in upid
    status = Tasks.blocking_status(pve, upid, timeout=30, polling_interval=0.05)
    assert status["status"] == "stopped" and status["exitstatus"] == "OK"
    cfg = pve.nodes("pve1").qemu(newid).config.get()
    assert cfg["name"] == "py-web1"
    assert cfg["net0"].startswith("virtio=BC:24:11:")
    log = pve.nodes("pve1").tasks(upid).log.get()
    assert log[-1]["t"] == "TASK OK"


def test_token_login_and_errors(sim):
    pve = token_api(sim)
    assert pve.version.get()["version"]
    # 4xx: parameter verification, with the errors map.
    with pytest.raises(ResourceException) as e4:
        pve.cluster.nextid.get(vmid=100)
    assert e4.value.status_code == 400
    assert "Parameter verification failed." in str(e4.value)
    assert e4.value.errors == {"vmid": "VM 100 already exists"}
    # 5xx: the message travels in the reason phrase.
    with pytest.raises(ResourceException) as e5:
        pve.nodes("pve1").qemu(999).config.get()
    assert e5.value.status_code == 500
    assert "Configuration file 'nodes/pve1/qemu-server/999.conf' does not exist" in str(e5.value)
    # skiplock is refused for tokens, root's included.
    with pytest.raises(ResourceException) as e:
        pve.nodes("pve1").qemu(100).delete(skiplock=1)
    assert e.value.errors == {"skiplock": "Only root may use this option."}


def test_wrong_password_is_an_authentication_error(sim):
    with pytest.raises(AuthenticationError):
        ProxmoxAPI("127.0.0.1", port=sim["port"], user="root@pam", password="wrong",
                   verify_ssl=False)
