"""Wire contracts: the KV-transfer gRPC service (kv_transfer.proto + generated stubs)
and the typed control messages the router and workers exchange over Ray."""
