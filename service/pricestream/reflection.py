"""gRPC server reflection, v1 and v1alpha, with grpcio-reflection's servicer.

grpcio-reflection ships only the v1alpha protocol. v1 is the same protocol under the package
``grpc.reflection.v1`` (tools such as grpcurl ask for it first): its descriptor is the v1alpha
one renamed, added to the default pool so that v1 names resolve too, and its calls are served
by the same servicer with the same (wire-identical) messages.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def add_reflection(server: Any, service_names: Sequence[str]) -> None:
    """Serve reflection (v1 and v1alpha) for ``service_names`` and for itself on ``server``
    (anything with grpc.Server's ``add_registered_method_handlers``)."""
    _add_v1_descriptor()
    servicer = reflection_aio.ReflectionServicer((*service_names, V1, V1ALPHA))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha.ServerReflectionRequest.FromString,
        response_serializer=v1alpha.ServerReflectionResponse.SerializeToString,
    )
    for name in (V1, V1ALPHA):
        server.add_registered_method_handlers(name, {"ServerReflectionInfo": handler})
