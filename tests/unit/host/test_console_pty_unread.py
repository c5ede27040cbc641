"""A pty console nobody reads (a daemonized gemu, a client that went away) never wedges the
machine: once the terminal's buffer is full, output waits a bounded moment, then is dropped
(and dropped at once while the terminal stays full), as QEMU's pty chardev does."""

from __future__ import annotations

import os

import pytest

from gemu.host.console import open_console


@pytest.mark.timeout(60)
def test_writing_to_an_unread_pty_is_bounded_and_drops_what_does_not_fit():
    con = open_console("pty", notice=lambda text: None)
    try:
        for _ in range(2000):  # 200 KB, far beyond the terminal's buffer
            con.line("x" * 100)
        state = con._write.state
        assert state["stalled"] and state["dropped"] > 100_000
    finally:
        con.close()


@pytest.mark.timeout(60)
def test_a_reader_that_comes_back_gets_output_again():
    con = open_console("pty", notice=lambda text: None)
    slave = os.open(con.filename.removeprefix("pty:"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        for _ in range(2000):
            con.line("y" * 100)
        # the reader drains the terminal: the next line is written, not dropped
        while True:
            try:
                if not os.read(slave, 65536):
                    break
            except BlockingIOError:
                break
        con.line("back")
        assert not con._write.state["stalled"]
        assert b"back" in os.read(slave, 4096)
    finally:
        os.close(slave)
        con.close()
