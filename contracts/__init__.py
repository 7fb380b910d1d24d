"""tandem.contracts: what every part of tandem agrees on, with no dependency on any of them.

Block hashing, KV events, the KV layout and its version, sampling parameters and request outputs,
and the conversions between these and the wire (the generated stubs live in `tandem.api`). Nothing
here imports torch or a device.
"""
