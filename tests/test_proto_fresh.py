"""The committed gRPC stubs are what `make proto` generates from the .proto file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from grpc_tools import protoc

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("pricestream_pb2.py", "pricestream_pb2.pyi", "pricestream_pb2_grpc.py")


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"-I{resources.files('grpc_tools') / '_proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto/pricestream/v1/pricestream.proto"),
        ]
    )
    assert status == 0
    for name in GENERATED:
        fresh = (tmp_path / "pricestream/v1" / name).read_text()
        committed = (ROOT / "service/pricestream/v1" / name).read_text()
        assert committed == fresh, f"{name} is stale: run `make proto` and commit the result"
