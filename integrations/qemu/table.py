#!/usr/bin/env python3
"""Turns measure.sh's JSON lines into a Markdown table: one row per mode, the median of each
figure over the runs with its range in brackets, and how many runs completed.

Usage: table.py RUNS.jsonl [...]   (lines of several files are pooled; rows keep the order in
which the modes first appear)
"""
import json
import statistics
import sys

# (column heading, JSON key, scale, decimals); bytes are shown in MB.
COLUMNS = [
    ("total ms", "total_time_ms", 1, 0),
    ("setup ms", "setup_time_ms", 1, 0),
    ("downtime ms", "downtime_ms", 1, 0),
    ("MB sent", "transferred", 1e-6, 0),
    ("CPU s src", "cpu_src_s", 1, 2),
    ("CPU s dst", "cpu_dst_s", 1, 2),
    ("longest tick gap ms", "max_tick_gap_ms", 1, 0),
    ("guest wrote MB/s", "guest_write_mbps", 1, 0),
]


def cell(values, scale, decimals):
    """The median and, when the runs differ, their range: "2570 (1951-3033)"."""
    if not values:
        return "-"
    xs = sorted(v * scale for v in values)
    fmt = "%%.%df" % decimals
    med = fmt % statistics.median(xs)
    if xs[0] == xs[-1]:
        return med
    return "%s (%s-%s)" % (med, fmt % xs[0], fmt % xs[-1])


def main(paths):
    rows = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    r = json.loads(line)
                    rows.setdefault(r["mode"], []).append(r)
    head = ["mode", "completed"] + [c[0] for c in COLUMNS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for mode, runs in rows.items():
        done = [r for r in runs if r.get("status") == "completed"]
        cells = [mode, "%d of %d" % (len(done), len(runs))]
        for _, key, scale, decimals in COLUMNS:
            cells.append(cell([r[key] for r in done if r.get(key) is not None], scale, decimals))
        print("| " + " | ".join(cells) + " |")
    for mode, runs in rows.items():
        for r in runs:
            if r.get("status") != "completed":
                print("\n%s run %s: %s (%s)" % (mode, r.get("run"), r.get("status"), r.get("error")))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
