"""Generated gRPC/protobuf code for protos/preimage/v1 (regenerate: python -m service.api.generate).

Import as ``from service.api.preimage.v1 import preimage_pb2, preimage_pb2_grpc``.
"""
