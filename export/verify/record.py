"""Verifies a folder that is being written and records the result in its report.json: the one
way every writer (export, quantize) ends. Imports torch only when it verifies."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from runtime.files import write_json


def verify_and_record(
    folder: Path,
    model,
    verify: bool,
    progress: Callable[[str], None] = lambda msg: None,
    **extra,
) -> dict:
    """Compares `folder` (not yet sealed) with the reference `model` when `verify`, writes
    report.json (the comparison, or {"verified": false}, plus `extra`), then raises ParityError
    past the tolerance: the report is written first, so a failure can be read afterwards."""
    if not verify:
        report = {"verified": False, **extra}
        write_json(Path(folder) / "report.json", report)
        return report
    from export.verify.parity import check, summary, verify_folder

    t = time.perf_counter()
    report = {**verify_folder(folder, model=model, check_files=False), **extra}
    write_json(Path(folder) / "report.json", report)
    check(report)
    progress(f"verify  {summary(report)} ({time.perf_counter() - t:.1f}s)")
    return report
