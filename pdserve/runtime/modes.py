"""How the workers are laid out (`--mode`) and how KV travels between them (`--transport`).

String enums: each member equals, prints and serializes as the CLI word it stands for, so a
`ClusterConfig` built from the flags, from a test's string or from a pickled deployment spec
compares the same, and output fields that carry these words keep their values.
"""

from __future__ import annotations

from enum import Enum


class _Word(str, Enum):
    """An enum whose members are the CLI's words (`str()` and f-strings give the word, on every Python)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def words(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class Mode(_Word):
    PD = "pd"  # prefill and decode workers, KV sent between them
    COLOCATED = "colocated"  # workers that each prefill (chunked, mixed into decode steps) and decode


class TransportKind(_Word):
    """The KV transports kvtransfer offers (kvtransfer.base.TRANSPORTS, in its order)."""

    AUTO = "auto"  # shared memory (or CUDA IPC) on the same node, gRPC across nodes
    SHM = "shm"
    CUDA_IPC = "cuda_ipc"
    GRPC = "grpc"
