"""Tensors of the KServe v2 protocol, read from requests and written into responses.

A client sends each input either as typed lists (`InferTensorContents`) or, as tritonclient does,
as raw little-endian bytes in `raw_input_contents`, one entry per input in order. A BYTES element
in raw form is a 4-byte little-endian length followed by that many bytes. LLM requests carry only
a handful of scalars and short strings, so elements become plain Python values (bytes, bool, int,
float), flattened: the shape ([1] for the vLLM backend's tensors, [1, 1] with the TensorRT-LLM
backend's batch dimension) is kept only to answer in the same shape.

Responses are written in raw form, which every KServe v2 client reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tandem.api.kserve.v2 import inference_pb2 as kpb
from tandem.frontend.request_rules import RequestError

# Fixed-width datatypes: struct format of one element (little-endian).
_FORMATS = {"BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q", "INT8": "b",
            "INT16": "h", "INT32": "i", "INT64": "q", "FP16": "e", "FP32": "f", "FP64": "d"}
# Which typed list of InferTensorContents holds each datatype.
_CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
             "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    values: list       # flattened elements: bytes, bool, int or float


def read_inputs(request: kpb.ModelInferRequest) -> dict[str, Tensor]:
    """The request's inputs by name; RequestError for a tensor that cannot be read."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} "
                           "inputs: send one per input, in order", "raw_input_contents")
    tensors: dict[str, Tensor] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in tensors:
            raise RequestError(f"input `{tensor.name}` is given twice", tensor.name)
        values = (_decode_raw(tensor.name, tensor.datatype, raw[i]) if raw
                  else _read_contents(tensor))
        tensors[tensor.name] = Tensor(tensor.name, tensor.datatype, tuple(tensor.shape), values)
    return tensors


def _decode_raw(name: str, datatype: str, data: bytes) -> list:
    if datatype == "BYTES":
        return _split_bytes(name, data)
    fmt = _FORMATS.get(datatype)
    if fmt is None:
        raise RequestError(f"input `{name}` has datatype {datatype!r}, which is not supported",
                           name)
    size = struct.calcsize(fmt)
    if len(data) % size:
        raise RequestError(f"input `{name}`: {len(data)} raw bytes are no whole number of "
                           f"{datatype} elements", name)
    return list(struct.unpack(f"<{len(data) // size}{fmt}", data))


def _split_bytes(name: str, data: bytes) -> list[bytes]:
    values, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise RequestError(f"input `{name}`: a BYTES element's 4-byte length is cut short",
                               name)
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise RequestError(f"input `{name}`: a BYTES element claims {length} bytes but "
                               f"{len(data) - offset} remain", name)
        values.append(bytes(data[offset:offset + length]))
        offset += length
    return values


def _read_contents(tensor: kpb.ModelInferRequest.InferInputTensor) -> list:
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        raise RequestError(f"input `{tensor.name}` has datatype {tensor.datatype!r}, which is not "
                           "supported", tensor.name)
    return list(getattr(tensor.contents, field))


def add_output(response: kpb.ModelInferResponse, name: str, datatype: str, values: list,
               shape: tuple[int, ...]) -> None:
    """Append one output tensor in raw form."""
    response.outputs.add(name=name, datatype=datatype, shape=shape)
    if datatype == "BYTES":
        data = b"".join(struct.pack("<I", len(v)) + v for v in values)
    else:
        data = struct.pack(f"<{len(values)}{_FORMATS[datatype]}", *values)
    response.raw_output_contents.append(data)
