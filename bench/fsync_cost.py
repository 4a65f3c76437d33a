#!/usr/bin/env python3
"""CPU time one small durable write costs this machine (pwrite of 100 bytes + fdatasync), back to
back and after idle gaps like those between edits at 1,000 and 200 edits/s. On a VM the kick to
the virtual disk and the wake-up after idling are charged to the process as system time.

    python3 bench/fsync_cost.py [DIR]      # DIR: a folder on the disk to test (default: target/)
"""
import os
import resource
import sys
import time

folder = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "target")
path = os.path.join(folder, "fsync-cost.bin")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
try:
    os.ftruncate(fd, 1 << 20)
    os.fsync(fd)
    for gap_ms in (0, 1, 5):
        n = 300
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        for i in range(n):
            os.pwrite(fd, b"x" * 100, (i * 100) % (1 << 20))
            os.fdatasync(fd)
            if gap_ms:
                time.sleep(gap_ms / 1000)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = (time.monotonic() - t0) / n - gap_ms / 1000
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        print(f"gap {gap_ms} ms: {cpu / n * 1e6:.0f} µs CPU per write+fdatasync, {wall * 1e6:.0f} µs wall (sleep excluded)")
    # What the sleeps alone cost, to subtract from the rows above.
    for gap_ms in (1, 5):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(300):
            time.sleep(gap_ms / 1000)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        print(f"gap {gap_ms} ms, sleep alone: {cpu / 300 * 1e6:.0f} µs CPU")
finally:
    os.close(fd)
    os.unlink(path)
