"""Summarise a ``py-spy record --format raw`` profile: samples per process/thread and the functions that hold the
most samples (inclusive), so a run's time can be read without a flamegraph viewer.

Usage: python3 scripts/profile_summary.py predict_profile.txt [top]
"""

from __future__ import annotations

import collections
import re
import sys


def summarise(path: str, top: int = 40) -> str:
    threads: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    with open(path, encoding="utf-8", errors="replace") as lines_in:
        raw = lines_in.read().splitlines()
    for line in raw:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f.split(" (")[0] for f in stack.split(";")]
        where = re.sub(r"\d+", "N", frames[0][:40]) + " | " + (frames[1][:40] if len(frames) > 1 else "")
        threads[where] += int(count)
        for name in dict.fromkeys(frames[2:]):  # once per sample, however deep the recursion
            inclusive[name] += int(count)
    total = sum(threads.values()) or 1
    lines = [f"{total} samples"]
    lines += [f"{n:7d} {100 * n / total:5.1f}%  {k}" for k, n in threads.most_common(8)]
    lines.append("inclusive:")
    lines += [f"{n:7d} {100 * n / total:5.1f}%  {k}" for k, n in inclusive.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarise(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40))
