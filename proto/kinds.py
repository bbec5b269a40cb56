"""Names shared across the process boundaries, as enums: transports, serving modes, finish reasons.

Each is a `str` enum whose values are the strings users type and read (CLI flags, output lines,
Prometheus labels), so a member compares equal to its string and serializes as it.
"""

from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    """A str enum that prints as its value (Python 3.10's str/Enum mixin prints `Cls.MEMBER`)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def words(cls) -> tuple[str, ...]:
        """The values, for argparse `choices` and error messages."""
        return tuple(m.value for m in cls)


class Transport(StrEnum):
    """How a request's KV cache travels from its prefill worker into its decode worker's pool."""

    AUTO = "auto"  # chosen per pair from placement: same node -> SHM (CPU) or CUDA_IPC (GPU), else GRPC
    SHM = "shm"  # POSIX shared memory: the prefill worker writes straight into the decode pool
    CUDA_IPC = "cuda_ipc"  # the decode pool's CUDA memory mapped into the prefill process
    GRPC = "grpc"  # a client stream of checksummed chunks, across nodes
    NONE = "none"  # nothing travelled (colocated workers, or a transfer that never began)

    @property
    def writes_in_place(self) -> bool:
        """The bytes are in the decode pool once the prefill call returns (no inbox to wait for)."""
        return self in (Transport.SHM, Transport.CUDA_IPC)


# What a user may ask for with --transport.
TRANSPORT_CHOICES = (Transport.AUTO, Transport.SHM, Transport.CUDA_IPC, Transport.GRPC)
TRANSPORT_NAMES = tuple(t.value for t in TRANSPORT_CHOICES)


class Mode(StrEnum):
    """How a deployment serves: disaggregated prefill/decode workers, or workers that do both."""

    PD = "pd"  # prefill and decode workers, KV sent between them
    COLOCATED = "colocated"  # workers that each prefill (chunked, mixed into decode steps) and decode


class FinishReason(StrEnum):
    """Why a request stopped generating (OpenAI's `finish_reason`; ERROR never reaches a user as one)."""

    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens reached
    ERROR = "error"  # the worker failed it (the result carries the error)
