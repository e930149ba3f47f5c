"""Proto enum values by their short lower-case names (``OPTIMIZER_NADAM`` → ``"nadam"``).

The server, the client library and the CLI all name enum values the same way through this one
function, so a value added to a proto enum is known everywhere at once.
"""

from __future__ import annotations

from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor

from service.api.preimage.v1 import preimage_pb2 as pb


def enum_names(enum: EnumDescriptor) -> dict[str, int]:
    """Every value of ``enum`` but its UNSPECIFIED zero, by its name without the enum's prefix."""
    prefix = "".join("_" + c if c.isupper() and i else c for i, c in enumerate(enum.name)).upper() + "_"
    return {v.name.removeprefix(prefix).lower(): v.number for v in enum.values if v.number != 0}


# EnergyParams' enum fields: field name → {short name: value}.
ENERGY_ENUMS: dict[str, dict[str, int]] = {
    f.name: enum_names(f.enum_type) for f in pb.EnergyParams.DESCRIPTOR.fields if f.type == FieldDescriptor.TYPE_ENUM
}
