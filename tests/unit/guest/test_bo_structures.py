"""The small structures that index a machine's BOs without a dict entry per BO: a file's
handle table (gem.Idr), a device's fake mmap offsets (gem.VmaOffsetManager), the driver's
list of live BOs (uapi.BoList), a BO's VM mappings (linked VmMappings) and the fields few
objects set (gem.RareField). Each behaves as the dict or list it replaced did."""

from __future__ import annotations

import pytest

from gemu.guest.drm import gem, gem_shmem
from gemu.guest.errors import Einval
from gemu.guest.gemu_drv.uapi import BoList, GemuBo, VmMapping
from gemu.guest.gemu_drv.vm import Prot
from gemu.host.machine import Machine
from tests.support.gem import release_shmem_device, shmem_device


def test_idr_hands_out_the_lowest_free_id_and_iterates_in_order():
    """Ids count up from 1; a freed id is reused lowest first (idr_alloc(..., 1, 0, ...));
    iteration, ``len``, ``in`` and ``get`` see only the live ids."""
    idr = gem.Idr()
    a, b, c, d = object(), object(), object(), object()
    assert [idr.alloc(x) for x in (a, b, c)] == [1, 2, 3]
    assert idr.remove(2) is b and idr.remove(1) is a and idr.remove(2) is None
    assert list(idr) == [3] and len(idr) == 1 and 3 in idr and 1 not in idr
    assert idr.alloc(d) == 1 and idr.alloc(b) == 2 and idr.alloc(a) == 4
    assert list(idr) == [1, 2, 3, 4] and idr.get(4) is a
    # ids a caller may pass that never named anything
    assert idr.get(0) is None and idr.get(-1) is None and idr.get(99) is None
    assert idr.get("1") is None and "1" not in idr and idr.remove(99) is None


@pytest.fixture
def dev_and_file():
    dev = shmem_device()
    file = gem.DrmFile(dev)
    yield dev, file
    gem.release(file)
    release_shmem_device(dev)


def test_handles_of_a_file_are_idr_ids(dev_and_file):
    """A deleted handle is refused, then reused by the next object, as before."""
    dev, file = dev_and_file
    objs = [gem_shmem.create(dev, gem.PAGE_SIZE) for _ in range(3)]
    handles = [gem.handle_create(file, o) for o in objs]
    for o in objs:
        gem.put(o)
    assert handles == [1, 2, 3]
    gem.handle_delete(file, 2)
    with pytest.raises(Einval, match="no GEM handle 2"):
        gem.handle_delete(file, 2)
    assert gem.object_lookup(file, 2) is None
    again = gem_shmem.create(dev, gem.PAGE_SIZE)
    assert gem.handle_create(file, again) == 2
    gem.put(again)
    assert sorted(file.object_idr) == [1, 2, 3]
    gem.release(file)
    assert len(file.object_idr) == 0 and dev.object_count == 0


def test_vma_offset_manager_finds_exact_offsets_through_holes_and_compaction():
    """Entries appended in increasing order are found by exact offset only; removed ones
    leave holes that lookups skip, and compacting the holes away (once they are half the
    entries) keeps every live entry where it was."""
    mgr = gem.VmaOffsetManager()
    objs = {off: object() for off in range(100, 400, 3)}  # 100 entries
    for off, obj in objs.items():
        mgr.add(off, obj)
    assert len(mgr) == 100 and list(mgr) == list(objs)
    assert mgr.get(103) is objs[103] and mgr.get(104) is None and 104 not in mgr
    for off in list(objs)[::2]:  # 50 holes: not yet more than half
        assert mgr.remove(off) is objs.pop(off)
    assert mgr.remove(100) is None and len(mgr) == 50 and list(mgr) == list(objs)
    for off in list(objs)[:10]:  # the 51st hole is past half: compacted, 9 holes since
        assert mgr.remove(off) is objs.pop(off)
    assert (len(mgr._offsets), mgr._holes, len(mgr)) == (49, 9, 40)
    assert all(mgr.get(off) is obj for off, obj in objs.items()) and list(mgr) == list(objs)
    # an offset below the last one still goes where it belongs
    low = object()
    mgr.add(101, low)
    assert mgr.get(101) is low and list(mgr) == sorted([101, *objs])


def test_bo_list_keeps_creation_order_and_iterates_a_snapshot():
    """BOs come out oldest first; removing one from the middle, the head or the tail
    relinks the rest; a BO that is not listed is not found; iterating while BOs go is safe."""
    bos = BoList()
    items = [GemuBo() for _ in range(5)]
    for bo in items:
        bos.add(bo)
    assert bos.values() == items and len(bos) == 5 and bos[items[2]] is items[2]
    assert bos.pop(items[2]) is items[2] and bos.pop(items[2], "gone") == "gone"
    assert bos.pop(items[0]) is items[0] and bos.pop(items[4]) is items[4]
    assert list(bos) == [items[1], items[3]] and items[0] not in bos
    with pytest.raises(KeyError):
        bos[items[4]]
    assert bos.get(object()) is None
    for bo in bos:  # a snapshot: unlinking meanwhile does not cut the walk short
        bos.pop(bo)
    assert len(bos) == 0 and bos.values() == []


def test_a_bo_lists_its_mappings_in_bind_order():
    """The linked mappings read as the list they replaced: bind order, lookup by VM,
    removal from anywhere."""
    bo = GemuBo()
    vms = [object() for _ in range(3)]
    maps = [VmMapping(vm, 0x100000 * (i + 1), 1, Prot.READ) for i, vm in enumerate(vms)]
    for m in maps:
        bo.add_mapping(m)
    assert bo.mappings == tuple(maps) and bo.mapping(vms[1]) is maps[1]
    bo.remove_mapping(maps[1])
    assert bo.mappings == (maps[0], maps[2]) and bo.mapping(vms[1]) is None
    bo.remove_mapping(maps[0])
    assert bo.mappings == (maps[2],) and bo.mapping(vms[2]) is maps[2]
    bo.remove_mapping(maps[2])
    assert bo.mappings == () and bo.mappings_head is None


def test_rare_fields_cost_nothing_until_set_and_nothing_once_reset():
    """A rare field reads as its default; setting another value makes the object's record,
    setting every rare field back to its default drops it again."""
    bo = GemuBo()
    assert bo._rare is None and bo.vaddr is None and bo.vmap_use_count == 0
    assert bo.pinned is False and bo.label is None and bo.name == "bo0"
    bo.pinned = False  # the default: nothing to keep
    assert bo._rare is None
    bo.label, bo.vmap_use_count = "scratch", 2
    assert bo._rare == {"label": "scratch", "vmap_use_count": 2} and bo.name == "scratch"
    bo.vmap_use_count = 0
    assert bo._rare == {"label": "scratch"}
    bo.label = None
    assert bo._rare is None and bo.name == "bo0"
    with pytest.raises(AttributeError):
        bo.no_such_field = 1  # still slotted: a misspelt field is an error


def test_machine_bos_index_without_dicts():
    """Through the uAPI: created BOs are in the driver's list and found by handle and by
    mmap offset; closing one takes it out of all three."""
    with Machine(ram_size=16 << 20, swap_size=0, device="inproc") as m:
        f = m.open()
        handles = [f.create_bo(4096, name=f"b{i}" if i == 1 else None) for i in range(3)]
        for h in handles:
            f.vm_bind(h)
        bos = [f.bo(h) for h in handles]
        assert [b for b in m.driver.bos if b in bos] == bos
        assert [b.name for b in bos] == [f"bo{bos[0].serial}", "b1", f"bo{bos[2].serial}"]
        dev = m.driver.dev
        assert all(dev.vma_offset_manager.get(b.vma_node) is b for b in bos)
        assert all(b._rare is None for b in (bos[0], bos[2])) and bos[1]._rare is not None
        node = bos[0].vma_node
        f.close_bo(handles[0])
        assert bos[0] not in m.driver.bos and node not in dev.vma_offset_manager
        assert bos[0].mappings == () and handles[0] not in f.drm.object_idr
        f.close()
