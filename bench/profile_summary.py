"""Summarise py-spy's collapsed stacks (``--format raw``) into shares of the sampled time.

Each line of a raw profile is ``frame;frame;...;frame count``, the outermost frame first (with
``--threads`` a thread frame before all). Per file this reports the share of samples per thread,
the top functions by self time (the innermost frame) and by inclusive time (the function
anywhere on the stack, counted once per sample).

    .venv/bin/python bench/profile_summary.py bench/results/profile/throughput.txt
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# "name (file.py:line)" -> "file.py:name"; the line number of --function is its first line.
_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^():]*)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['file']}:{match['name']}"


def read_stacks(path: Path) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(frame_name(f) for f in stack.split(";"))] += int(count)
    return stacks


def summarize(paths: list[Path], top: int = 25) -> dict[str, Any]:
    """Shares (0-1) of all samples of ``paths``, by thread, by self and by inclusive time."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for path in paths:
        stacks.update(read_stacks(path))
    total = sum(stacks.values())
    if not total:
        return {"samples": 0}
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, count in stacks.items():
        frames = stack
        if stack and stack[0].startswith("thread ("):  # "thread (tid): name" (--threads)
            threads[stack[0].partition(": ")[2]] += count
            frames = stack[1:]
        if frames:
            own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count

    def shares(counter: Counter[str]) -> dict[str, float]:
        return {name: round(n / total, 4) for name, n in counter.most_common(top)}

    return {
        "files": [str(p) for p in paths],
        "samples": total,
        "threads": shares(threads),
        "self": shares(own),
        "inclusive": shares(inclusive),
    }


def main() -> int:
    paths = [Path(p) for p in sys.argv[1:]]
    if not paths:
        print(__doc__)
        return 2
    print(json.dumps(summarize(paths), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
