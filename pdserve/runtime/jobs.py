"""`pdserve submit`: a batch as a Ray Job, through Ray's job submission API (the dashboard port).

Client side (`submit`): the input goes up in the job's working_dir; the job runs
`pdserve run-batch --address auto` on the cluster; its logs stream back here
as they come; at the end the job prints the output file (zlib + base64,
between markers, with a checksum: `emit`) and this side writes it to -o. Only
the job API is needed: no shared filesystem, no Ray client port.

Job side: `python -m pdserve.jobs INPUT OUTPUT [run-batch options]` (pdserve/jobs.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

BEGIN, END = "PDSERVE-OUTPUT-BEGIN", "PDSERVE-OUTPUT-END"
CHUNK = 76 * 1024


def emit(path: Path) -> None:
    data = path.read_bytes()
    packed = base64.b64encode(zlib.compress(data, 6)).decode()
    print(BEGIN, flush=True)
    for i in range(0, len(packed), CHUNK):
        print(packed[i:i + CHUNK], flush=True)
    print(f"{END} {hashlib.sha256(data).hexdigest()} {len(data)}", flush=True)


class _Collector:
    """Splits a job's log into what a person reads and the embedded output file."""

    def __init__(self) -> None:
        self.inside = False
        self.chunks: list[str] = []
        self.digest: str | None = None
        self.size = -1
        self._partial = ""

    def feed(self, text: str) -> str:
        shown = []
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip() == BEGIN:
                self.inside = True
            elif line.startswith(END):
                self.inside = False
                _, self.digest, size = line.split()
                self.size = int(size)
            elif self.inside:
                self.chunks.append(line.strip())
            else:
                shown.append(line)
        return "\n".join(shown) + ("\n" if shown else "")

    def output(self) -> bytes:
        if self.digest is None:
            raise RuntimeError("the job's log holds no output file: it failed before writing it")
        data = zlib.decompress(base64.b64decode("".join(self.chunks)))
        if len(data) != self.size or hashlib.sha256(data).hexdigest() != self.digest:
            raise RuntimeError("the output file came back damaged (checksum mismatch)")
        return data


def submit(input_path: Path, output_path: Path, address: str, run_batch_args: list[str],
           python: str = "python", poll_s: float = 1.0) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    from pdserve.runtime.cluster import use_cluster_token

    use_cluster_token()
    if not input_path.is_file():
        raise FileNotFoundError(f"input file {input_path} does not exist")
    if not output_path.resolve().parent.is_dir():
        raise FileNotFoundError(f"output directory {output_path.resolve().parent} does not exist")
    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="pdserve-job-") as tmp:
        shutil.copy(input_path, Path(tmp) / "input.jsonl")
        entrypoint = " ".join([python, "-m", "pdserve.jobs", "input.jsonl", "output.jsonl", *run_batch_args])
        deadline = time.time() + 120
        while True:
            try:
                job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": tmp},
                                           metadata={"tool": "pdserve", "input": input_path.name})
                break
            except RuntimeError as e:  # the head's job agent is still starting: Ray asks to try again
                if "No available agent" not in str(e) or time.time() > deadline:
                    raise
                time.sleep(2)
    print(f"submitted Ray job {job_id} to {address}", file=sys.stderr)
    collector = _Collector()

    async def stream() -> None:
        async for text in client.tail_job_logs(job_id):
            sys.stderr.write(collector.feed(text))
            sys.stderr.flush()

    try:
        asyncio.run(stream())
    except Exception as e:  # log streaming is best effort; the status below decides
        print(f"pdserve: log stream ended early ({e}); waiting for the job", file=sys.stderr)
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                            JobStatus.STOPPED):
        time.sleep(poll_s)
    if collector.digest is None:  # the stream may have missed the tail: read the whole log
        collector = _Collector()
        collector.feed(client.get_job_logs(job_id) + "\n")
    if status != JobStatus.SUCCEEDED:
        print(f"pdserve: job {job_id} {status.value}: {client.get_job_info(job_id).message}", file=sys.stderr)
        return 1
    output_path.write_bytes(collector.output())
    print(f"job {job_id} succeeded; results: {output_path}")
    return 0
