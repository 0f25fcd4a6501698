#!/usr/bin/env python3
"""The link emulator of the benchmarks, as a script: `lazyfs.bench.link` does the work.

    python tools/linkemu.py --listen 127.0.0.1:8081 --target 127.0.0.1:8080 \\
        --rtt-ms 20 --rate-mbit 100 --aggregate

Each direction sends the bytes of all connections (--aggregate) one after another at the
link's rate, then delays them by half the RTT; a new connection costs a round trip; no byte
arrives before such a link could have delivered it. The benchmark scripts import
`start_link_emulator` (a subprocess) and `run_link_emulator` (inside trio) from here.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lazyfs.bench.link import (  # noqa: E402
    Serializer,
    main,
    run_link_emulator,
    start_link_emulator,
)

__all__ = ["Serializer", "main", "run_link_emulator", "start_link_emulator"]

if __name__ == "__main__":
    main(prog="tools/linkemu.py")
