"""runtime: the allocator tuning."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest


def huge_pages_always() -> bool:
    """Transparent huge pages for every mapping: a 96 MiB block then faults in 2 MiB at a time."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return thp.is_file() and "[always]" in thp.read_text()


# Allocates, fills and frees a 96 MiB tensor 40 times; prints the minor page faults of each time.
FAULTS = """
import resource, sys, torch
from alexnet.runtime import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator()
counts = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(24 << 20).sum()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*counts)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.skipif(huge_pages_always(), reason="the fault counts assume 4 KiB pages")
def test_tuned_allocator_reuses_large_blocks_without_faulting_pages_in_again():
    """Untuned, glibc maps every block above 32 MiB afresh, so each allocation faults in its 24,576 pages
    again. Tuned, freed blocks stay in the heap and are reused: torch's 64-byte aligned allocations may
    grow the heap by a few more blocks before one freed block fits (up to 13 in 50 runs here), after
    which none faults again, as in a training loop's steady state. The last 20 of the 40 are checked."""
    counts = {}
    for mode in ("default", "tuned"):
        p = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        counts[mode] = [int(n) for n in p.stdout.split()]
    assert min(counts["default"][20:]) > 20_000, counts  # the control: the faults the tuning removes
    assert max(counts["tuned"][20:]) < 100, counts
