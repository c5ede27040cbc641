"""The C page copy (``guest/mm/_pagecopy.c``) against the Python copy it stands in for
(Hypothesis, derandomized), and against hostile arguments.

``copy_pages(dst, dst_pages, src, src_pages, shift)`` must move exactly the bytes
``copy_page_views`` moves between page views, in the same order (a page listed twice as a
destination ends with the last copy; one buffer may be both ends). Anything it is handed that
is not two buffers and two equal lists of in-range page numbers is an exception naming what
was wrong, with both buffers unchanged: it never writes outside them and never crashes.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemu.guest.mm import extents
from gemu.guest.mm.extents import copy_page_views, page_views

DET = settings(derandomize=True, max_examples=300, deadline=None, database=None)
SOURCE = Path(__file__).resolve().parents[2] / "guest" / "mm" / "_pagecopy.c"


@pytest.fixture(scope="module")
def copy_pages():
    """The compiled copy (whether or not GEMU_PAGECOPY=python keeps the model off it); this
    install is expected to have it: ci/setup.sh builds it."""
    try:
        from gemu.guest.mm._pagecopy import copy_pages
    except ImportError as e:
        pytest.fail(
            f"gemu.guest.mm._pagecopy is not built ({e}): run ci/setup.sh, which needs a C "
            "compiler and Python's headers (it installs them with apt as root)"
        )
    return copy_pages


def test_the_page_copy_is_compiled_and_can_be_turned_off() -> None:
    """The install built the C copy, and GEMU_PAGECOPY=python turns it off (every copy then
    goes through copy_page_views)."""
    from gemu.guest.mm import _pagecopy

    assert os.environ.get("GEMU_PAGECOPY") == "python" or (
        extents.native_copy_pages is _pagecopy.copy_pages
    )
    probe = "from gemu.guest.mm import extents; print(extents.native_copy_pages)"
    env = dict(os.environ, GEMU_PAGECOPY="python")
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "None"


def test_the_source_compiles_without_warnings() -> None:
    """_pagecopy.c builds clean with the warnings a reviewer would turn on."""
    cc = shutil.which(sysconfig.get_config_var("CC").split()[0]) or shutil.which("cc")
    assert cc, "no C compiler: ci/setup.sh installs one"
    include = sysconfig.get_paths()["include"]
    subprocess.run(
        [cc, "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-std=c11", f"-I{include}", SOURCE],
        check=True,
        capture_output=True,
    )


@DET
@given(st.integers(0, 12), st.integers(0, 5), st.booleans(), st.data())
def test_copy_pages_is_the_copy_between_page_views(
    copy_pages, nr_pages, shift, one_buffer, data
) -> None:
    """The same bytes as copy_page_views for any batch: none, one or many pages, repeats,
    pages of 1 to 32 bytes, two buffers or one."""
    size = 1 << shift
    pages = st.lists(st.integers(0, 15), min_size=nr_pages, max_size=nr_pages)
    src_pages, dst_pages = data.draw(pages), data.draw(pages)
    rnd = random.Random(data.draw(st.integers(0, 1 << 16)))
    src = bytearray(rnd.randbytes(16 * size + rnd.randrange(size)))  # a partial last page
    dst = src if one_buffer else bytearray(rnd.randbytes(16 * size))
    expect_dst, expect_src = bytearray(dst), bytearray(src)
    if one_buffer:
        expect_src = expect_dst
    copy_page_views(
        page_views(memoryview(expect_dst), shift),
        dst_pages,
        page_views(memoryview(expect_src), shift),
        src_pages,
    )
    copy_pages(dst, dst_pages, src, src_pages, shift)
    assert dst == expect_dst and src == expect_src


def _hostile_cases(buf: bytearray, ro: bytes):
    """(arguments, exception, message) for every kind of bad call."""
    mv = memoryview(buf)
    return [
        ((buf, [0], buf, [4], 12), IndexError, r"src_pages\[0\] = 4 outside the buffer's 4 pages"),
        ((buf, [0, -1], buf, [0, 1], 12), IndexError, r"dst_pages\[1\] = -1 outside"),
        ((buf, [1 << 70], buf, [0], 12), IndexError, r"dst_pages\[0\] = 1180591620717411303424"),
        ((buf, [0, 1], buf, [0], 12), ValueError, "2 destination pages for 1 source pages"),
        ((buf, [0.0], buf, [0], 12), TypeError, r"dst_pages\[0\] is float, not an int"),
        ((buf, ["1"], buf, [0], 12), TypeError, r"dst_pages\[0\] is str"),
        ((buf, 3, buf, [0], 12), TypeError, "dst_pages must be a sequence"),
        ((buf, [0], buf, None, 12), TypeError, "src_pages must be a sequence"),
        ((ro, [0], buf, [1], 12), BufferError, "not writable"),
        ((buf, [0], object(), [1], 12), TypeError, "bytes-like object is required"),
        ((mv[::2], [0], buf, [1], 0), BufferError, "contiguous"),
        ((buf, [0], buf, [1], -1), ValueError, "shift -1 outside 0..30"),
        ((buf, [0], buf, [1], 31), ValueError, "shift 31 outside 0..30"),
        ((buf, [0], buf, [1], "12"), TypeError, "integer"),
        ((buf, [0], buf, [1]), TypeError, r"takes 5 arguments .* 4 given"),
    ]


def test_a_bad_call_names_the_fault_and_copies_nothing(copy_pages) -> None:
    """Every malformed call raises an exception that says what was wrong (which list, which
    position, which number) and both buffers stay as they were: the pages are all checked
    before the first byte moves."""
    rnd = random.Random(5)
    original = rnd.randbytes(4 << 12)
    buf = bytearray(original)
    ro = bytes(4 << 12)
    for args, exc, message in _hostile_cases(buf, ro):
        with pytest.raises(exc, match=message):
            copy_pages(*args)
        assert buf == original, args
    # a bad page late in the batch: the good ones before it are not copied either
    with pytest.raises(IndexError, match=r"dst_pages\[3\]"):
        copy_pages(buf, [1, 2, 3, 9], buf, [0, 0, 0, 0], 12)
    assert buf == original
    released = memoryview(bytearray(4096))
    released.release()
    with pytest.raises(ValueError, match="released"):
        copy_pages(released, [0], buf, [0], 12)


_ANY = st.one_of(
    st.none(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.binary(max_size=64),
    st.lists(st.one_of(st.integers(-3, 20), st.floats(), st.none()), max_size=6),
    st.tuples(st.integers(-3, 20), st.integers(-3, 20)),
)


@settings(derandomize=True, max_examples=400, deadline=None, database=None)
@given(st.lists(_ANY, min_size=0, max_size=6), st.booleans(), st.integers(-1, 7))
def test_any_arguments_raise_or_copy_in_bounds(copy_pages, args, use_buffers, shift) -> None:
    """Fuzzing the argument list (Hypothesis): whatever it is given, copy_pages either
    copies whole pages inside the buffers or raises one of its documented exceptions; the
    bytes past the destination's whole pages are never written."""
    guard = b"\xa5" * 8
    dst = bytearray(64) + bytearray(guard)  # the guard is a partial page at shift 4 to 6
    if use_buffers and len(args) >= 3:
        args[0] = memoryview(dst)
        args[2] = bytes(range(72))
        if len(args) == 5:
            args[4] = shift
    with contextlib.suppress(TypeError, ValueError, IndexError, BufferError):
        copy_pages(*args)
    assert bytes(dst[64:]) == guard or not 4 <= shift <= 6


_PAGE = st.one_of(st.integers(-2, 9), st.integers(-(1 << 65), 1 << 65), st.booleans())


@settings(derandomize=True, max_examples=400, deadline=None, database=None)
@given(st.lists(_PAGE, max_size=5), st.lists(_PAGE, max_size=5), st.integers(-1, 7))
def test_pages_near_the_ends_stay_inside_the_buffers(copy_pages, dst_pages, src_pages, shift):
    """Page numbers around both ends of the buffers, at every page size: a batch either is
    copied exactly as the per-page loop copies it (every number a whole page inside) or is
    refused with nothing written; the partial page at the end is never touched."""
    dst = bytearray(64) + b"\xa5" * 8
    src = bytes(range(72))
    expect = bytearray(dst)
    ok = 0 <= shift <= 30 and len(dst_pages) == len(src_pages)
    nr = 72 >> shift if 0 <= shift <= 30 else 0
    ok = ok and all(0 <= p < nr for p in [*dst_pages, *src_pages])
    if ok:
        size = 1 << shift
        for d, s in zip(dst_pages, src_pages):
            expect[d * size : (d + 1) * size] = src[s * size : (s + 1) * size]
    try:
        copy_pages(dst, dst_pages, src, src_pages, shift)
    except (ValueError, IndexError):
        assert not ok
    else:
        assert ok
    assert dst == expect
