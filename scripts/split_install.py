"""Split pip's resolved install plan into N requirement files of about equal size (scripts/env.sh installs them
with N pip processes at once: pip unpacks one wheel after another on one core, 6 GB for torch and its CUDA wheels).

    python scripts/split_install.py REPORT.json N PREFIX   ->  PREFIX.0.txt ... PREFIX.<N-1>.txt, NAME==VERSION a line

REPORT.json is `pip install --dry-run --report`: every package pip would install, at the versions it resolved, so
installing the parts with --no-deps installs exactly that set (pinned by name, not by the wheel's URL, so that pip
records them as it would any index install). Standard library only (it runs in a bare venv).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
import urllib.request


def wheel_size(url: str) -> int:
    """Bytes of a local wheel (file:// URL); 0 for one pip will download (its size is not in the report)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "file":
        return 0
    try:
        return os.path.getsize(urllib.request.url2pathname(parsed.path))
    except OSError:
        return 0


def split(wheels: list[tuple[str, str]], parts: int) -> list[list[str]]:
    """(requirement, wheel URL) pairs into parts of requirements: the largest wheel first, each to the part with
    the fewest bytes so far (ties: the fewest wheels)."""
    groups: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for size, spec in sorted(((wheel_size(url), spec) for spec, url in wheels), key=lambda pair: -pair[0]):
        i = min(range(parts), key=lambda j: (loads[j], len(groups[j])))
        groups[i].append(spec)
        loads[i] += size
    return [g for g in groups if g]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python scripts/split_install.py REPORT.json N PREFIX", file=sys.stderr)
        return 2
    report, parts, prefix = argv[0], int(argv[1]), argv[2]
    with open(report) as f:
        wheels = [(f"{item['metadata']['name']}=={item['metadata']['version']}", item["download_info"]["url"])
                  for item in json.load(f).get("install", [])]
    for i, group in enumerate(split(wheels, max(1, parts))):
        with open(f"{prefix}.{i}.txt", "w") as f:
            f.write("\n".join(group) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
