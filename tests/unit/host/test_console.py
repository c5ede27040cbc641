"""The raw-line discipline of serial consoles (pty, sockets, pyserial) over a fake line."""

from __future__ import annotations

import pytest

from gemu.host.console import Console, ConsoleInterrupt


def _console(*chunks: bytes, raw: bool = True):
    feed = list(chunks)
    sent: list[bytes] = []

    def read(timeout: float):
        return feed.pop(0) if feed else b""

    return Console(read, sent.append, raw=raw, name="fake"), sent


def test_raw_line_echo_editing_and_crlf():
    """Bytes are echoed, Backspace/DEL erase (a whole UTF-8 character), Ctrl-U kills the
    line, CR or LF or CRLF end it; output newlines become CRLF."""
    con, sent = _console(b"ab\x7fc\xc3\xa9\x08d\r\n", b"x\x15yz\n")
    assert con.readline("p# ") == "acd"
    assert con.readline() == "yz"
    con.write("one\ntwo\n")
    out = b"".join(sent)
    assert out.startswith(b"p# ab\b \bc")
    assert out.endswith(b"one\r\ntwo\r\n")


def test_raw_ctrl_c_interrupts_and_ctrl_d_ends_input():
    """Ctrl-C raises ConsoleInterrupt; Ctrl-D on an empty line is end of input."""
    con, _ = _console(b"abc\x03")
    with pytest.raises(ConsoleInterrupt):
        con.readline()
    con, _ = _console(b"\x04")
    assert con.readline() is None


def test_cooked_lines_and_eof():
    """stdio delivers whole lines (CR stripped); end of input returns the partial line, then
    None."""
    con, sent = _console(b"one\r\ntw", b"o\nthree", raw=False)
    assert [con.readline(), con.readline(), con.readline(), con.readline()] == [
        "one",
        "two",
        "three",
        None,
    ]
    con.write("a\n")
    assert sent == [b"a\n"]


def test_idle_runs_while_nothing_arrives():
    """readline calls idle() on each empty poll; idle may stop the wait by raising."""
    calls = []

    def idle():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")

    con = Console(lambda t: None, lambda b: None, raw=True, name="idle")
    with pytest.raises(RuntimeError, match="device lost"):
        con.readline(idle=idle)
    assert len(calls) == 3


def test_unix_console_socket_is_owner_only_whatever_the_umask(tmp_path):
    """--serial unix:PATH listens on a socket of mode 0600 even under umask 000: the console
    is a guest shell without authentication (it followed the umask: srwxrwxrwx)."""
    import os
    import socket
    import stat
    import threading

    from gemu.host.console import open_console

    path = tmp_path / "console.sock"
    listening = threading.Event()
    result = {}

    def serve():
        old = os.umask(0)
        try:
            result["console"] = open_console(f"unix:{path}", notice=lambda _: listening.set())
        finally:
            os.umask(old)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert listening.wait(10)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    t.join(10)
    client.close()
    result["console"].close()
