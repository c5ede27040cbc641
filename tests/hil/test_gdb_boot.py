"""``gemu boot --gdb ... -S``: gdb attached to the GPU of a booted machine.

The machine boots with its device's command processor held for gdb (``gemu boot --gdb -S``,
or a device started by hand with ``--gdb -S`` and ``gemu boot --device``); a job submitted at
the shell prompt waits until gdb, which sees it on the ring, detaches.
"""

from __future__ import annotations

import socket

import pexpect

from tests.support.device import gemu_executable
from tests.support.gdb import gdb_batch, needs_gdb, spawn_gdb_device

PROMPT = "gemu# "


pytestmark = needs_gdb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_while_held(child: pexpect.spawn, port: int) -> None:
    """Submit a copy at the prompt, look at it with gdb, detach, check it completed."""
    child.expect_exact(PROMPT)
    for line in ("src = bo 64K", "dst = bo 64K", "fill src random 1"):
        child.sendline(line)
        child.expect_exact(PROMPT)
    child.sendline("f1 = submit copy src dst")
    child.expect_exact(PROMPT)
    out = gdb_batch(port, "p $x0", "monitor ring", "detach")
    assert "$1 = 5" in out and "INDIRECT_BUFFER" in out and "detached" in out, out
    child.sendline("wait f1")
    child.expect_exact(PROMPT)
    assert "f1: signaled" in child.before, child.before
    child.sendline("expect crc dst == src")
    child.expect_exact(PROMPT)
    assert "FAIL" not in child.before, child.before
    child.sendline("poweroff")
    child.expect(pexpect.EOF)


def test_boot_on_a_device_held_by_gdb():
    """`gemu boot --device unix:...` on a `gemu device --gdb ... -S` started by hand: the
    machine boots with the CP held, a copy job submitted at the prompt is on the ring when gdb
    looks (x0 = HALTED), and completes once gdb detaches."""
    exe, *pre = gemu_executable()
    with spawn_gdb_device() as dev:
        argv = [*pre, "boot", "-m", "16M", "--device", dev.spec]
        child = pexpect.spawn(exe, argv, timeout=30, encoding="utf-8", echo=False)
        try:
            _job_while_held(child, dev.gdb_port)
        finally:
            child.close(force=True)
    assert child.exitstatus == 0


def test_boot_with_gdb_holds_the_gpu_until_gdb_detaches():
    """The machine boots to its prompt with the CP held (-S); a copy job submitted at the
    shell is on the ring when gdb looks (x0 = HALTED), and completes once gdb detaches."""
    port = _free_port()
    exe, *pre = gemu_executable()
    argv = [*pre, "boot", "-m", "16M", "--gdb", f"tcp:127.0.0.1:{port}", "-S"]
    child = pexpect.spawn(exe, argv, timeout=30, encoding="utf-8", echo=False)
    try:
        _job_while_held(child, port)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
