"""Quantized base weights read as floats, whatever layout the quantizer left them in, without touching the layer.

bitsandbytes keeps a 4-bit weight in one of two layouts on CPU:

* the ordinary one: ``(N*K/2, 1)`` bytes, element ``e = n*K + k`` in nibble ``e % 2`` (high first) of byte
  ``e // 2``, with fp32 ``absmax`` per block of ``blocksize`` consecutive elements (nested: quantized again);
* the *packed* one (``quant_state.packing_format_for_cpu``): on a CPU with AVX-512 BF16, ``Linear4bit.forward``
  repacks the weight **in place** at its first forward in eval mode without grad, for its bf16 kernel: bytes
  ``(N, K/2)`` holding tiles of 32 rows, ``absmax`` transposed to ``(K/blocksize, N)`` and cast to bf16.

bitsandbytes' own ``dequantize_4bit`` reads only the first layout, and its inverse conversion rewrites the
layer's state (for an un-nested state it also leaves ``absmax`` transposed, which corrupts the weight), so the
packed layout is decoded here, from the bytes, into the weight the packed kernel computes with
(``code[q] * bf16(absmax)``); nothing of the layer is written.

Where bitsandbytes itself computes a layer as a dense matmul with the dequantized weight, `fuses_noise` says so
and `dequantize_as` gives that weight as bitsandbytes forms it, in a new buffer: the exact mode then adds ``E``
to that buffer in place and runs one matmul at ``deq(W0) + E`` (`flatlora._quantized_op`).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

_PACK_ROWS = 32  # rows per tile: bitsandbytes' _convert_weight_packed_for_cpu(block_n=32), as Linear4bit calls it


def is_quantized(base: nn.Module) -> bool:
    """bitsandbytes (and other packed) weights: integer storage that cannot hold ``W + E``."""
    w = base.weight
    return type(w).__name__ in ("Params4bit", "Int8Params") or not w.dtype.is_floating_point


def dequantize(base: nn.Module) -> torch.Tensor:
    """The float weight of a quantized layer, ``(out, in)`` as stored, in either bitsandbytes layout.

    8-bit weights go through PEFT's ``dequantize_bnb_weight`` with the layer's ``state``: PEFT's
    ``dequantize_module_weight`` would also re-assign ``module.weight`` on CPU, which drops an 8-bit weight's
    scales (``SCB``) once the layer has run forward and breaks its next forward (bitsandbytes 0.50).
    """
    from peft.utils.integrations import dequantize_bnb_weight, dequantize_module_weight

    w = base.weight
    kind = type(w).__name__
    if kind == "Params4bit" and getattr(w.quant_state, "packing_format_for_cpu", False):
        return dequantize_packed_4bit(w.data, w.quant_state)
    if kind in ("Params4bit", "Int8Params"):
        return dequantize_bnb_weight(w, state=getattr(base, "state", None))
    return dequantize_module_weight(base)


def dequantize_packed_4bit(data: torch.Tensor, quant_state) -> torch.Tensor:
    """Decode a 4-bit weight in bitsandbytes' CPU packed layout into fp32 ``(N, K)``; reads, never writes.

    Byte ``(n, j)`` of the ``(N, K/2)`` storage belongs to tile ``n // 32``; within a tile the bytes run over
    ``(k-pair, row, pair member)`` with the low nibble for rows 0-15 and the high nibble for rows 16-31 of
    the tile (the inverse of ``_convert_weight_packed_for_cpu``). ``W[n, k] = code[q[n, k]] * absmax[k // bs, n]``.
    """
    n_rows, n_cols = (int(d) for d in quant_state.shape)
    bs = int(quant_state.blocksize)
    raw = data.view(torch.uint8)
    if (n_rows % _PACK_ROWS or n_cols % 2 or n_cols % bs or raw.numel() * 2 != n_rows * n_cols
            or tuple(quant_state.absmax.shape) != (n_cols // bs, n_rows)):
        raise ValueError(
            f"a bitsandbytes 4-bit weight of shape {(n_rows, n_cols)} (blocksize {bs}) is marked packed for CPU but "
            f"holds {raw.numel()} bytes and absmax {tuple(quant_state.absmax.shape)}: not the packed layout this "
            "bitsandbytes version writes; exclude the layer (exclude_modules) and report the bitsandbytes version")
    tiles = raw.reshape(-1, _PACK_ROWS)
    q = torch.cat([tiles & 0xF, tiles >> 4], dim=1)  # (N*K/64, 64): per (tile, k-pair), 32 rows x 2 columns
    q = q.reshape(n_rows // _PACK_ROWS, n_cols // 2, _PACK_ROWS, 2).transpose(1, 2).reshape(n_rows, n_cols)
    scale = quant_state.absmax.float().t().repeat_interleave(bs, dim=1)  # (N, K)
    return quant_state.code.float()[q.long()] * scale


def _packed(w) -> bool:
    return bool(getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False))


def _scb(base: nn.Module) -> torch.Tensor | None:
    """An 8-bit weight's row scales: on the weight until the layer's first forward, then in its ``state``."""
    scb = getattr(base.weight, "SCB", None)
    return scb if scb is not None else getattr(getattr(base, "state", None), "SCB", None)


def fuses_noise(base: nn.Module) -> bool:
    """Whether bitsandbytes computes this layer as ``F.linear(x, deq(W0), b)`` with its own ``forward``, so the
    exact mode can compute ``F.linear(x, deq(W0) + E, b)`` instead, with one matmul:

    * 4-bit (NF4/FP4, nested or not) in the ordinary layout, on every device: ``matmul_4bit`` dequantizes the
      weight in the compute dtype and runs a dense matmul (forward and input gradient);
    * 8-bit in training mode on CPU/XPU: ``MatMul8bitFp``, ``int8 * SCB / 127`` then a dense matmul.

    Not: a 4-bit weight in the CPU-packed layout (its kernel rounds the input and the output to bf16 and has no
    backward), an 8-bit layer on CUDA or in eval mode (LLM.int8 quantizes the activations too), weights without
    their quantization state, and subclasses with their own ``forward``. On those the noise stays beside the
    layer (`flatlora.targets.noise_beside`), so the layer computes bitsandbytes' own numbers.
    """
    w = base.weight
    kind = type(w).__name__
    bnb = sys.modules.get("bitsandbytes")  # loaded whenever a weight is one of its types; never imported here
    if kind not in ("Params4bit", "Int8Params") or bnb is None:
        return False
    if kind == "Params4bit":
        return (type(base).forward is bnb.nn.Linear4bit.forward and getattr(w, "quant_state", None) is not None
                and not _packed(w))
    return (type(base).forward is bnb.nn.Linear8bitLt.forward and w.dtype == torch.int8 and base.training
            and w.device.type in ("cpu", "xpu") and _scb(base) is not None)


def dequantize_as(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``deq(W0)`` ``(out, in)`` in ``dtype``, formed as bitsandbytes' dense matmul forms it (`fuses_noise`
    layers only), in a new tensor the caller may write; the layer is only read.

    4-bit: ``dequantize_4bit`` straight into ``dtype`` with the block scales (nested: decoded from their 8-bit
    codes, plus the offset), as ``gemm_4bit`` does. 8-bit: ``int8.to(dtype) * (SCB / 127)``, as ``MatMul8bitFp``.
    """
    w = base.weight
    if type(w).__name__ == "Params4bit":
        qs = w.quant_state
        absmax = qs.absmax
        if qs.nested:
            absmax = sys.modules["bitsandbytes"].functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        return torch.ops.bitsandbytes.dequantize_4bit.default(w.data, absmax.float(), qs.blocksize, qs.quant_type,
                                                               qs.shape, dtype)
    return w.data.to(dtype, copy=True).mul_(_scb(base).unsqueeze(1).mul(1.0 / 127.0))
