"""align/heap.py: training stages keep freed memory in the process (glibc), and give it back after."""

from __future__ import annotations

import ctypes

import pytest

from align import heap

pytestmark = pytest.mark.skipif(heap.glibc() is None, reason="glibc only (mallopt, mallinfo2)")

MIB = 2**20


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mmapped_bytes() -> int:
    """Bytes glibc currently serves from mmap'd blocks (``mallinfo2().hblkhd``)."""
    libc = heap.glibc()
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2().hblkhd


def mmapped_by_allocation(size: int) -> int:
    """How many more mmap'd bytes glibc holds while a block of ``size`` bytes is allocated."""
    libc = heap.glibc()
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = mmapped_bytes()
    block = libc.malloc(size)
    assert block
    try:
        return mmapped_bytes() - before
    finally:
        libc.free(block)


def test_a_large_block_comes_from_the_heap_inside_and_from_mmap_after(monkeypatch):
    monkeypatch.delenv(heap.ENV, raising=False)
    assert mmapped_by_allocation(64 * MIB) >= 64 * MIB  # glibc's default: above 32 MiB always mmap
    with heap.keep_freed_memory() as kept:
        assert kept is True
        assert mmapped_by_allocation(64 * MIB) == 0
    assert mmapped_by_allocation(64 * MIB) >= 64 * MIB  # defaults restored


def test_nested_blocks_restore_once_at_the_outermost(monkeypatch):
    monkeypatch.delenv(heap.ENV, raising=False)
    with heap.keep_freed_memory():
        with heap.keep_freed_memory():
            pass
        assert mmapped_by_allocation(64 * MIB) == 0  # the inner exit left the outer's setting alone
    assert mmapped_by_allocation(64 * MIB) >= 64 * MIB


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_the_environment_turns_it_off(monkeypatch, value):
    monkeypatch.setenv(heap.ENV, value)
    with heap.keep_freed_memory() as kept:
        assert kept is False
        assert mmapped_by_allocation(64 * MIB) >= 64 * MIB


def test_rlhf_runs_inside_it_and_the_offline_trainers_do_not(monkeypatch):
    from align.cli import COMMANDS, _load_commands

    _load_commands()
    seen = []
    real = heap.keep_freed_memory

    def spy():
        seen.append(True)
        return real()

    monkeypatch.setattr(heap, "keep_freed_memory", spy)
    rlhf = COMMANDS["rlhf"].run
    assert rlhf.__wrapped__.__name__ == "run_rlhf"
    with pytest.raises(AttributeError):  # a None config fails at once, after the heap setting is made
        rlhf(None)
    assert seen == [True]
    assert mmapped_by_allocation(64 * MIB) >= 64 * MIB  # and undone when the stage failed
    for name in ("sft", "rm", "dpo"):  # measured: no gain worth their memory (align/heap.py)
        assert not hasattr(COMMANDS[name].run, "__wrapped__")
