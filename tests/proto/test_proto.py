"""The committed gRPC stubs are exactly what the committed .proto generates."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_up_to_date(tmp_path):
    from grpc_tools import protoc

    (tmp_path / "proto").mkdir()
    shutil.copy(ROOT / "proto" / "kv_transfer.proto", tmp_path / "proto")
    rc = protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                      str(tmp_path / "proto" / "kv_transfer.proto")])
    assert rc == 0
    for name in ("kv_transfer_pb2.py", "kv_transfer_pb2_grpc.py"):
        assert (tmp_path / "proto" / name).read_text() == (ROOT / "proto" / name).read_text(), \
            f"proto/{name} is stale: run `make proto`"
