"""gRPC server reflection, v1 and v1alpha, with grpcio-reflection's servicer.

grpcio-reflection ships only the v1alpha protocol. v1 is the same protocol under the package
``grpc.reflection.v1`` (tools such as grpcurl ask for it first): its descriptor is the v1alpha
one renamed, added to the default pool so that v1 names resolve too, and its calls are served
by the same servicer with the same (wire-identical) messages.

The file descriptors it serves carry every field's ``json_name``, as protoc hands them to its
plugins and as grpc-go servers serve them: Python's generated descriptors leave it out, and
clients such as grpcurl 1.9 then print ``session_id`` where the proto3 JSON mapping (and the
README's grpcurl example) says ``sessionId``.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = "grpc.reflection.v1"
    proto.ClearField("options")
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name.removeprefix(old)
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type.removeprefix(old)
            method.output_type = new + method.output_type.removeprefix(old)
    pool.Add(proto)


def _json_name(name: str) -> str:
    """protoc's ToJsonName: drop each underscore and upper-case the letter after it."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _fill_json_names(messages: Any) -> None:
    for message in messages:
        for field in message.field:
            if not field.HasField("json_name"):
                field.json_name = _json_name(field.name)
        _fill_json_names(message.nested_type)


@functools.lru_cache(maxsize=256)
def _with_json_names(serialized: bytes) -> bytes:
    """A serialized FileDescriptorProto with ``json_name`` set on every message field."""
    proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    _fill_json_names(proto.message_type)
    return proto.SerializeToString()


def _serve_json_names(info: Any) -> Any:
    """Wrap ServerReflectionInfo so that the file descriptors it answers carry json_name."""

    async def serve(requests: Any, context: Any) -> AsyncIterator[Any]:
        async for response in info(requests, context):
            if response.WhichOneof("message_response") == "file_descriptor_response":
                files = response.file_descriptor_response.file_descriptor_proto
                filled = [_with_json_names(data) for data in files]
                del files[:]
                files.extend(filled)
            yield response

    return serve


def add_reflection(server: Any, service_names: Sequence[str]) -> None:
    """Serve reflection (v1 and v1alpha) for ``service_names`` and for itself on ``server``
    (anything with grpc.Server's ``add_registered_method_handlers``)."""
    _add_v1_descriptor()
    servicer = reflection_aio.ReflectionServicer((*service_names, V1, V1ALPHA))
    handler = grpc.stream_stream_rpc_method_handler(
        _serve_json_names(servicer.ServerReflectionInfo),
        request_deserializer=v1alpha.ServerReflectionRequest.FromString,
        response_serializer=v1alpha.ServerReflectionResponse.SerializeToString,
    )
    for name in (V1, V1ALPHA):
        server.add_registered_method_handlers(name, {"ServerReflectionInfo": handler})
