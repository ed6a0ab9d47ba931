"""CLI start-up: how long ``matloop --help``, an argument error and ``matloop status`` take from a cold process.

Usage: ``python benchmarks/startup.py [--repeat 5]``

Each command runs ``--repeat`` times as a fresh process (the installed ``matloop`` entry point
beside this interpreter); the median wall time is printed. Goal: ``--help`` under 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "matloop --help": ["--help"],
    "matloop generate --target -5 (argument error)": ["generate", "--target", "-5"],
    "matloop status (empty lake)": ["status"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    exe = Path(sys.executable).with_name("matloop")
    with tempfile.TemporaryDirectory() as lake:
        for label, argv in COMMANDS.items():
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                subprocess.run([str(exe), "--lake", lake, *argv], capture_output=True, check=False)
                times.append(time.perf_counter() - t0)
            print(f"{label:48s} median {statistics.median(times):.2f} s (min {min(times):.2f}, {args.repeat} runs)")


if __name__ == "__main__":
    main()
