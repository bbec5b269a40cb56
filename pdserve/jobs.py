"""The job side of `pdserve submit` (pdserve/runtime/jobs.py): run-batch on the cluster, then the output
file printed into the job's log for the client to take back.

    python -m pdserve.jobs INPUT OUTPUT [run-batch options]
"""

from __future__ import annotations

import sys
from pathlib import Path

from pdserve.cli import main as cli
from pdserve.runtime.jobs import emit


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    inp, out, rest = argv[0], argv[1], argv[2:]
    if "--address" not in rest:
        rest += ["--address", "auto"]
    code = cli(["run-batch", "-i", inp, "-o", out, *rest])
    if code == 0:
        emit(Path(out))
    return code


if __name__ == "__main__":
    sys.exit(main())
