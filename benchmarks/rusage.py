"""Run a command as a child process and print what it cost: wall, user and system seconds, minor page
faults and peak resident memory (``resource.getrusage(RUSAGE_CHILDREN)``). Used for the "Host
allocator" rows of BENCHMARKS.md, e.g.

    python benchmarks/rusage.py cuba defend strip RUN
    CUBA_HOST_ALLOCATOR=system python benchmarks/rusage.py cuba defend strip RUN
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python benchmarks/rusage.py COMMAND [ARGS ...]", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rc = subprocess.run(argv, stdout=subprocess.DEVNULL).returncode
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"wall {time.perf_counter() - t0:.1f} user {r.ru_utime:.1f} sys {r.ru_stime:.1f} "
          f"minflt {r.ru_minflt} maxrss_MB {r.ru_maxrss / 1024:.0f} rc {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
