"""Tiny models for Soft Thinking: a copy of a generated model with two tokens renamed to the
thinking tags (control tokens "<think>" and "</think>"), and optionally its output projection
scaled, to make a model that is certain (large scale: entropy ~0) or uncertain (0: uniform)."""

from __future__ import annotations

import pathlib
from typing import Optional

import gguf
import numpy as np

OPEN_TAG, CLOSE_TAG = "<think>", "</think>"


def with_thinking_tags(
    src: str | pathlib.Path, dst: str | pathlib.Path, open_id: int, close_id: int, output_scale: Optional[float] = None
) -> str:
    """Writes `src` to `dst` with token open_id renamed "<think>" and close_id "</think>" (control tokens),
    and output.weight times output_scale when given; returns dst. The weights are otherwise copied bit for bit,
    so the model computes what `src` computes for the same token ids."""
    reader = gguf.GGUFReader(src)
    architecture = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dst, architecture)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == gguf.Keys.Tokenizer.LIST:
            value[open_id], value[close_id] = OPEN_TAG, CLOSE_TAG
        elif field.name == gguf.Keys.Tokenizer.TOKEN_TYPE:
            value[open_id] = value[close_id] = gguf.TokenType.CONTROL
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    tensors = []
    for tensor in reader.tensors:
        data = tensor.data
        if tensor.name == "output.weight" and output_scale is not None:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, "output.weight must be F32 to scale it"
            data = (np.asarray(data, dtype=np.float32) * np.float32(output_scale)).astype(np.float32)
        tensors.append((tensor, data))
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, data in tensors:
        writer.write_tensor_data(np.ascontiguousarray(data), tensor_endianess=reader.endianess)
    writer.close()
    return str(dst)
