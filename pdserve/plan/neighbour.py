"""A busy neighbour for the profile: another process running one stage back to back on the same device.

Prefill and decode workers on one node interfere even on separate cores (memory bandwidth, the
shared cache, SMT siblings; on one GPU, its SMs), so the profile times each stage a second time with
this neighbour running the other stage beside it (pdserve.plan.profile.measure). It loads its own copy
of the model in a spawned process: what a second worker on the node would hold.
"""

from __future__ import annotations

import base64
import pickle
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

STAGES = ("idle", "prefill", "decode")


class Neighbour:
    """`with Neighbour(engine, threads, sizes) as n: n.run("prefill"); ...` (the process stops on exit).

    A child interpreter (`python -m pdserve.plan.neighbour`, so no caller needs a __main__ guard) takes
    its settings and then stage names on stdin and answers each stage once it has completed a call of it."""

    def __init__(self, engine: Any, threads: int, sizes: Any, start_timeout_s: float = 300.0) -> None:
        self.timeout_s = start_timeout_s
        self.settings = (engine, threads, int(statistics.median(sizes.prefill_tokens)),  # a typical prefill
                         int(statistics.median(sizes.decode_batches)), int(min(sizes.decode_contexts)))
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> Neighbour:
        self._proc = subprocess.Popen([sys.executable, "-m", "pdserve.plan.neighbour"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        try:
            self._send(base64.b64encode(pickle.dumps(self.settings)).decode())
            self._expect("idle", self.timeout_s)
        except BaseException:
            self.__exit__()  # __exit__ does not run when __enter__ raises: the child must not outlive us
            raise
        return self

    def run(self, stage: str) -> None:
        """Switch the neighbour to `stage` (prefill, decode or idle); returns once it has completed a call of it."""
        if stage not in STAGES:
            raise ValueError(f"a neighbour runs one of {STAGES}, not {stage!r}")
        self._send(stage)
        self._expect(stage, 120.0)

    def _send(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()

    def _expect(self, stage: str, timeout_s: float) -> None:
        """Wait for the child's answer `stage` (its stdout carries answers only: see _serve). A reader
        left waiting after a timeout only ever sees a child that is about to be stopped."""
        assert self._proc is not None and self._proc.stdout is not None
        answer: list[str] = []
        reader = threading.Thread(target=lambda: answer.append(self._proc.stdout.readline().strip()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if answer and answer[0] == stage:
            return
        code = self._proc.poll()
        if code is not None or answer == [""]:  # EOF: the child is gone (its error is on our stderr)
            why = f"it exited with code {self._proc.wait(timeout=30)}"
        elif not answer:
            why = f"no answer within {timeout_s:g}s"
        else:
            why = f"it answered {answer[0]!r}"
        raise RuntimeError(f"the profile's neighbour process did not start {stage!r}: {why}")

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        try:
            self._proc.stdin.close()  # EOF: the child stops
            self._proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()


def _serve(settings: tuple, answers) -> None:
    import torch

    from engine.runner import ModelRunner
    from pdserve.plan.decode_inputs import decode_step_inputs

    engine, threads, prompt_tokens, batch, context = settings
    if threads > 0:
        torch.set_num_threads(threads)
    runner = ModelRunner(engine)
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, runner.arch.vocab_size, (min(prompt_tokens, runner.arch.max_position_embeddings),),
                           generator=gen).tolist()
    step = decode_step_inputs(runner, batch, min(context, runner.arch.max_position_embeddings - 2), gen)
    wanted = ["idle"]

    def read_stages() -> None:
        for line in sys.stdin:
            wanted[0] = line.strip()
        wanted[0] = "stop"

    threading.Thread(target=read_stages, daemon=True).start()
    answered = None
    while (stage := wanted[0]) != "stop":
        if stage == "prefill":
            runner.prefill([prompt], None)
        elif stage == "decode":
            runner.decode(*step)
        else:
            time.sleep(0.005)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        if stage != answered:
            print(stage, file=answers, flush=True)
            answered = stage


def _answers_only_on_stdout():
    """A text stream on the original stdout for the answers; fd 1 then points at stderr, so anything else
    printed (a library, a compiler run by a kernel build) cannot be taken for an answer."""
    import os

    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return answers


if __name__ == "__main__":
    _serve(pickle.loads(base64.b64decode(sys.stdin.readline())), _answers_only_on_stdout())
