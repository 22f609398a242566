"""The one exception type every decoder raises for malformed input."""


class CodecError(Exception):
    """Bytes that do not form a valid packet, TLV or field.

    Decoders convert every low-level failure (short buffers, bad lengths,
    out-of-range values) into this type, so callers that read from the wire
    need exactly one ``except`` clause to count a drop instead of crashing.
    """
