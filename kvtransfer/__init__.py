"""KV-cache transfer from prefill workers into decode workers' paged pools."""

from kvtransfer.base import (
                             TRANSPORTS,
                             IncompatiblePeer,
                             IntegrityError,
                             KVConnection,
                             KVEndpoint,
                             TransferError,
                             TransferStats,
                             TransferTimeout,
                             Unauthenticated,
                             connect,
                             select_transport,
)

__all__ = ["TRANSPORTS", "IncompatiblePeer", "IntegrityError", "KVConnection", "KVEndpoint", "TransferError",
           "TransferStats", "TransferTimeout", "Unauthenticated", "connect", "select_transport"]
