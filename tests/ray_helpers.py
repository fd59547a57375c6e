"""A worker for the Ray fault test (`tests/test_units.py`): stability_cliff's, which first leaves a marker naming the
unit and its process and then waits, so the test can kill the process while the unit runs."""

import hashlib
import os
import time
from pathlib import Path

from dcvla.studies import stability_cliff

MARKERS = "DCVLA_TEST_MARKERS"  # the folder the markers go to (the environment the Ray workers inherit)


def worker(config: dict):
    real = stability_cliff.worker(config)

    def run(unit, path: Path) -> None:
        folder = Path(os.environ[MARKERS])
        marker = folder / f"{key(unit)}.{os.getpid()}.{time.monotonic_ns()}"
        marker.write_text(str(os.getpid()))
        time.sleep(2.0)
        real(unit, path)

    return run


def key(unit) -> str:
    return hashlib.md5(unit.name.encode()).hexdigest()[:12]
