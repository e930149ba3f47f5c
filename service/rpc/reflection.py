"""Server reflection under both names clients ask for: ``grpc.reflection.v1`` and ``v1alpha``.

Newer grpcurl, Postman and grpcui ask ``grpc.reflection.v1.ServerReflection`` first; the
grpcio-reflection package installed here serves only ``v1alpha``. The two protocols are the same
messages with the same field numbers under another package name, so one servicer answers both:
v1 is registered as a generic handler with v1alpha's (identical) message classes, and v1's file
descriptor (v1alpha's, renamed) is added to the pool so that ``describe`` works for it too.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as alpha

V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE = reflection.SERVICE_NAME
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    alpha.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    old, new = f".{alpha.DESCRIPTOR.package}.", f".{V1_PACKAGE}."
    for message in proto.message_type:
        for f in message.field:
            if f.type_name.startswith(old):
                f.type_name = new + f.type_name[len(old) :]
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    proto.options.Clear()
    pool.Add(proto)


def enable_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection for ``service_names`` (plus both reflection services) under v1 and v1alpha."""
    pool = descriptor_pool.Default()
    _add_v1_descriptor(pool)
    names = (*service_names, V1_SERVICE, V1ALPHA_SERVICE)
    servicer = reflection.ReflectionServicer(names, pool=pool)
    reflection.enable_server_reflection(names, server, pool=pool)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=alpha.ServerReflectionRequest.FromString,
        response_serializer=alpha.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": handler}),)
    )
