"""gemu run/boot --strict-signalling: the option reaches the machine's lockdep mode, and the
correct driver runs an example clean in that stricter mode."""

from __future__ import annotations

from pathlib import Path

from gemu.guest.locking import lockdep
from gemu.host import cli, machine

HELLO = Path(__file__).resolve().parents[3] / "examples" / "jobs" / "hello.job"


def test_the_option_reaches_the_machine(monkeypatch):
    seen = {}
    real = machine.Machine.__init__

    def init(self, *a, **kw):
        seen.update(kw)
        real(self, *a, **kw)

    monkeypatch.setattr(machine.Machine, "__init__", init)
    try:
        assert cli.main(["run", "-q", "--device", "inproc", "--strict-signalling", str(HELLO)]) == 0
        assert seen["strict_signalling"] is True
        assert cli.main(["run", "-q", "--device", "inproc", str(HELLO)]) == 0
        assert seen["strict_signalling"] is False
    finally:
        lockdep.set_implicit_signalling(False)
