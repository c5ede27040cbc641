"""Symbols for command buffers: gemu's ELF symbol file, read back by pyelftools and used by
the real gdb-multiarch so packets are named by the buffer they belong to."""

from __future__ import annotations

import io
import subprocess

import pytest
from elftools.elf.elffile import ELFFile

from gemu.device.abi import packets as pk
from gemu.device.symfile import CommandBuffer, build_symbol_elf, read_symbols, write_symbol_elf
from gemu.guest.gemu_drv.job import BoAccess
from gemu.host.cmd_gdb import EXTENSION, write_job_symbols
from gemu.host.machine import Machine
from tests.support.device import attached_client, gemu_executable
from tests.support.gdb import DATA_VA, IB_VA, gdb_batch, needs_gdb, setup_job, spawn_gdb_device

IB = [
    pk.fill(DATA_VA, 0x100, 0x11223344),
    pk.write_data(DATA_VA + 0x200, [0xDEADBEEF]),
    pk.nop(2),
    pk.atomic_add(DATA_VA + 0x208, 5),
]


def _symbols(data: bytes) -> dict[str, tuple[int, int, str]]:
    elf = ELFFile(io.BytesIO(data))
    out = {}
    for sym in elf.get_section_by_name(".symtab").iter_symbols():
        if sym.name:
            section = elf.get_section(sym["st_shndx"]).name
            out[sym.name] = (sym["st_value"], sym["st_size"], section)
    return out


def test_symbol_file_reads_back_with_pyelftools():
    """Each buffer is a NOBITS section at its address with a FUNC symbol of its size; labels
    are symbols inside it; bad names, labels outside and duplicates are refused by name."""
    data = build_symbol_elf(
        [
            CommandBuffer("copy_job", 0x100000, 0x40, {"copy_job_fence": 0x28}),
            CommandBuffer("ring_tail", 0x1000, 0x20),
        ]
    )
    elf = ELFFile(io.BytesIO(data))
    assert elf["e_machine"] == "EM_AARCH64" and elf["e_type"] == "ET_EXEC"
    sec = elf.get_section_by_name(".gemu.copy_job")
    assert (sec["sh_type"], sec["sh_addr"], sec["sh_size"]) == ("SHT_NOBITS", 0x100000, 0x40)
    assert _symbols(data) == {
        "copy_job": (0x100000, 0x40, ".gemu.copy_job"),
        "copy_job_fence": (0x100028, 0x18, ".gemu.copy_job"),
        "ring_tail": (0x1000, 0x20, ".gemu.ring_tail"),
    }
    with pytest.raises(ValueError, match="'a b' is not a symbol name"):
        build_symbol_elf([CommandBuffer("a b", 0, 4)])
    with pytest.raises(ValueError, match="label x at \\+0x8 is outside"):
        build_symbol_elf([CommandBuffer("j", 0, 8, {"x": 8})])
    with pytest.raises(ValueError, match="same name"):
        build_symbol_elf([CommandBuffer("j", 0, 8), CommandBuffer("j", 8, 8)])


@needs_gdb
def test_gdb_names_packets_by_their_command_buffer(tmp_path):
    """With the symbol file loaded, a stop in the IB reads `copy_job+20`: in `info symbol
    $pc`, in `x/2i $pc` (decoded by the extension) and at a label (`copy_job_atomic`)."""
    syms = write_symbol_elf(
        tmp_path / "jobs.elf",
        [CommandBuffer("copy_job", IB_VA, sum(map(len, IB)), {"copy_job_atomic": 0x30})],
    )
    with spawn_gdb_device() as dev, attached_client(dev.spec, size=1 << 20) as client:
        setup_job(client, IB)
        out = gdb_batch(
            dev.gdb_port,
            f"source {EXTENSION}",
            f"add-symbol-file {syms}",
            f"break *{IB_VA + 0x14:#x}",
            "continue",
            "info symbol $pc",
            "x/2i $pc",
            "stepi",
            "stepi",
            "info symbol $pc",
            "delete",
            "detach",
        )
    assert "copy_job + 20 in section .gemu.copy_job" in out, out
    assert f"=> {IB_VA + 0x14:#x} <copy_job+20>:\tWRITE_DATA 0x100200, [0xdeadbeef]" in out, out
    assert "copy_job_atomic in section .gemu.copy_job" in out, out


def test_python_api_names_a_submitted_jobs_command_buffer(tmp_path):
    """write_job_symbols names the command buffer of a job submitted through GemuFile at its
    GPU VA, with its size and the labels given."""
    with Machine(ram_size=8 << 20, swap_size=0) as m:
        f = m.open()
        bo = f.create_bo(4096)
        va = f.vm_bind(bo)
        cmd = pk.fill(va, 64, 1) + pk.fill(va + 64, 64, 2)
        fence = f.submit(cmd, bos=[(bo, BoAccess.WRITE)])
        f.wait(fence, 10)
        path = write_job_symbols(
            tmp_path / "jobs.elf", {"fill_job": fence}, {"fill_job": {"fill_job_second": 20}}
        )
        ib_va = fence.job.ib_va
        assert _symbols(path.read_bytes()) == {
            "fill_job": (ib_va, len(cmd), ".gemu.fill_job"),
            "fill_job_second": (ib_va + 20, len(cmd) - 20, ".gemu.fill_job"),
        }
        with pytest.raises(ValueError, match="nope: 7 is not a submitted job"):
            write_job_symbols(tmp_path / "x.elf", {"nope": 7})
        f.close()
        m.check_clean()


@needs_gdb
def test_core_files_carry_the_names(tmp_path):
    """`monitor symbol-file` gives the device the names; the core of the job's fault carries
    them (pyelftools reads them back from the core) and `gemu coredump` and `monitor status`
    name the failing packet copy_job+0x14."""
    bad = [pk.fill(DATA_VA, 0x10, 1), pk.fill(0x90_0000, 4, 1)]
    syms = write_symbol_elf(tmp_path / "jobs.elf", [CommandBuffer("copy_job", IB_VA, 0x28)])
    cores = tmp_path / "cores"
    with (
        spawn_gdb_device("--coredump-dir", str(cores)) as dev,
        attached_client(dev.spec, size=1 << 20) as client,
    ):
        setup_job(client, bad)
        out = gdb_batch(
            dev.gdb_port,
            f"monitor symbol-file {syms}",
            "continue",
            "monitor status",
            f"monitor symbol-file {tmp_path}/missing.elf",
            "detach",
        )
    assert "1 command buffer(s) named" in out and "copy_job: 0x200000+0x28" in out, out
    assert "SIGSEGV" in out and "(IB VA, copy_job+0x14)" in out, out
    assert "error: " in out and "missing.elf: not a symbol file" in out, out
    (core,) = cores.iterdir()
    assert read_symbols(core) == [CommandBuffer("copy_job", IB_VA, 0x28)]
    summary = subprocess.run(
        [*gemu_executable(), "coredump", str(core)], capture_output=True, text=True, check=True
    ).stdout
    assert f"packet:  {IB_VA + 0x14:#x} <copy_job+0x14>: FILL 0x900000" in summary, summary
    assert "symbols: copy_job 0x200000+0x28" in summary, summary


@needs_gdb
def test_load_writes_the_packets_and_moves_pc_to_the_entry(tmp_path):
    """At a stop on the IB's first packet, `load` of a symbol file carrying packets writes
    them at the IB's VA (through AS1) and sets pc to its entry; the job then runs them: the
    new WRITE_DATA stores its word, the replaced FILL never runs."""
    new = pk.write_data(DATA_VA + 0x300, [0xC0FFEE]) + pk.nop(len(IB[0]) // 4 - 4 - 1)
    assert len(new) == len(IB[0])
    elf = write_symbol_elf(
        tmp_path / "patch.elf", [CommandBuffer("patch", IB_VA, len(new), data=new)]
    )
    with spawn_gdb_device() as dev, attached_client(dev.spec, size=1 << 20) as client:
        job = setup_job(client, IB)
        out = gdb_batch(
            dev.gdb_port,
            "monitor as 1",
            f"break *{IB_VA:#x}",
            "continue",
            f"load {elf}",
            "p/x $pc",
            "delete",
            "detach",
        )
        ram = client.memory
        deadline = 2000
        while ram.read_u64(job.data_pa + 0x3000) != 7 and deadline:
            client.wait_irq(0.005)
            deadline -= 1
        assert "Loading section .gemu.patch" in out and "Transfer rate" in out, out
        assert f"$1 = {IB_VA:#x}" in out, out
        assert ram.read_u32(job.data_pa + 0x300) == 0xC0FFEE
        assert ram.read_u32(job.data_pa) == 0, "the FILL was replaced before it ran"
        assert ram.read_u64(job.data_pa + 0x3000) == 7


def test_job_script_symbols_command_names_jobs_by_their_fence_names(tmp_path):
    """`symbols FILE` in a job script names every job's command buffer by its fence name, at
    its GPU VA; naming a job that does not exist, or writing before any job, is an error that
    says so."""
    from gemu.guest import errors
    from gemu.host.shell import Shell

    strict = errors.is_strict()
    errors.set_strict(False)
    try:
        with Machine(ram_size=8 << 20, swap_size=0, device="inproc") as m:
            out: list[str] = []
            sh = Shell(m, out.append)
            assert not sh.run_line(f"symbols {tmp_path}/none.elf", "t.job", 1)
            assert "symbols: no job with a command buffer submitted yet" in "\n".join(out)
            for n, line in enumerate(
                ["src = bo 64K", "dst = bo 64K", "fill src 7", "copy_job = submit copy src dst"]
            ):
                assert sh.run_line(line, "t.job", n + 2), out
            assert sh.run_line("wait copy_job", "t.job", 6), out
            assert sh.run_line(f"symbols {tmp_path}/jobs.elf", "t.job", 7), out
            assert f"{tmp_path}/jobs.elf: 1 command buffer(s) named: copy_job" in out
            assert not sh.run_line(f"symbols {tmp_path}/x.elf nope", "t.job", 8)
            assert "symbols: no job named 'nope'" in "\n".join(out)
            job = sh.fences["copy_job"].fence.job
            syms = _symbols((tmp_path / "jobs.elf").read_bytes())
            assert syms == {"copy_job": (job.ib_va, 4 * job.ib_dwords, ".gemu.copy_job")}
            sh.poweroff()
    finally:
        errors.set_strict(strict)
