"""An exception no command turned into a message still reaches the user as one line naming
it, with exit 70, never as a traceback; GEMU_DEBUG=1 shows the traceback."""

from __future__ import annotations

import pytest

from gemu.host import cli, cmd_boot


def _broken(*_args):
    raise RuntimeError("the model broke")


def test_an_unexpected_exception_is_one_line_and_exit_70(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("GEMU_DEBUG", raising=False)
    monkeypatch.setattr(cmd_boot, "cmd_run", _broken)
    script = tmp_path / "x.job"
    script.write_text("a = bo 4K\n")
    status = cli.main(["run", str(script)])
    err = capsys.readouterr().err
    assert status == cli.EXIT_INTERNAL == 70
    assert "gemu run: internal error: RuntimeError: the model broke" in err
    assert "Traceback" not in err


def test_gemu_debug_shows_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMU_DEBUG", "1")
    monkeypatch.setattr(cmd_boot, "cmd_run", _broken)
    script = tmp_path / "x.job"
    script.write_text("a = bo 4K\n")
    with pytest.raises(RuntimeError, match="the model broke"):
        cli.main(["run", str(script)])
