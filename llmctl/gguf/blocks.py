"""Decode GGUF quantized blocks into the inputs of ONNX Runtime's ``MatMulNBits``.

``MatMulNBits`` computes ``(code - zero_point) * scale`` per block of ``block_size`` codes
along the input dimension, with 4- or 8-bit codes, and accepts zero points either as packed
unsigned integers or as floats of the scale's type. Every format below fits that form
exactly, so a GGUF weight becomes a ``MatMulNBits`` weight with the same codes:

- symmetric formats use the operator's default zero point: Q4_0 (8, the 4-bit default);
  Q5_0, Q6_K and Q8_0 store their codes shifted so that their offset (16, 32, 0) lands on
  the 8-bit default of 128;
- formats with a minimum (``value = d * q + m``: Q4_1, Q5_1, Q4_K, Q5_K) keep a zero point
  of 0 and ``m`` as a per-block offset, and the graph adds ``m`` times the block sums of the
  input (see ``transcode``). Float zero points ``-m / d`` would need no extra branch, but the
  CPU kernel of ``MatMulNBits`` (onnxruntime 1.32) rejects them with 8-bit codes and runs
  about 10 times slower with them on 4-bit codes;
- K-quants carry 6-bit sub-block scales and minimums under a super-block scale; these are
  multiplied out into one scale (and minimum) per sub-block: 32 values for Q4_K and Q5_K,
  16 for Q6_K. The factors are kept too (``FactoredValues``), so that the graph can store
  them at the GGUF's size and multiply them out when it loads;
- 5- and 6-bit codes are 8-bit codes. Q5_0 and Q5_1 also keep their packed 5-bit form
  (``FiveBitCodes``), which the graph can store and unpack when it loads.

The block layouts follow ggml's reference C implementation (``ggml-quants.c``); the tests
check every decoder against ``gguf.quants.dequantize``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

QK_K = 256  # values per K-quant super-block


@dataclass
class FiveBitCodes:
    """Q5_0 and Q5_1 codes as the GGUF packs them: ``codes = (low | high_bit << 4) + shift``.

    Attributes:
        low_nibbles: uint8 ``[N, n_blocks, 16]``; byte j holds the low 4 bits of codes j
            (low nibble) and j + 16 (high nibble) of its block.
        high_bits: uint8 ``[N, n_blocks, 4]``; bit j of this little-endian 32-bit field is
            the 5th bit of code j.
        shift: added to every unpacked 5-bit value to give ``BlockWeight.codes``.
    """

    low_nibbles: np.ndarray
    high_bits: np.ndarray
    shift: int

    def select_rows(self, rows: np.ndarray) -> FiveBitCodes:
        return FiveBitCodes(self.low_nibbles[rows], self.high_bits[rows], self.shift)

    def unpack(self) -> np.ndarray:
        """Return the 5-bit values (without ``shift``) as uint8 ``[N, n_blocks, 32]``."""
        n, n_blocks, _ = self.low_nibbles.shape
        return (_nibbles(self.low_nibbles) | _high_bits_32(self.high_bits)).reshape(n, n_blocks, 32)


@dataclass
class FactoredValues:
    """Per-block values that a K-quant stores as a super-block scale times an integer factor.

    ``values[:, b] == super_scales[:, b // per_super] * factors[:, b]`` holds exactly in
    float32, because a float16 scale times an integer below 2**8 needs at most 19 bits.

    Attributes:
        super_scales: float32 ``[N, n_super]``, each exactly a float16 value.
        factors: uint8 or int8 ``[N, n_blocks]``.
    """

    super_scales: np.ndarray
    factors: np.ndarray

    def select_rows(self, rows: np.ndarray) -> FactoredValues:
        return FactoredValues(self.super_scales[rows], self.factors[rows])


@dataclass
class BlockWeight:
    """A ``[N, K]`` weight matrix as ``MatMulNBits`` codes, scales and zero points.

    Attributes:
        source_type: the GGUF block type the codes came from (``"Q4_K"``).
        bits: 4 or 8, the ``MatMulNBits`` code width.
        block_size: values per scale along K (16 or 32).
        codes: uint8 ``[N, K]``, one unpacked code per value, each below ``2**bits``.
        scales: float32 ``[N, K // block_size]``.
        zero_points: None (the operator's default ``2**(bits-1)``), uint8 or float32
            ``[N, K // block_size]``.
        offsets: None, or float32 ``[N, K // block_size]`` added to every value of a block:
            ``value = (code - zero_point) * scale + offset``.
        minimums: for float zero points, the block minimums ``m`` they were computed from
            (``zero_point = -m / scale``). They are float16-exact for Q4_1, so the graph can
            store them at half the size and derive the zero points when it loads.
        five_bit: the packed form of 5-bit codes, or None.
        scale_factors: ``scales`` as K-quant factors, or None.
        offset_factors: ``offsets`` as K-quant factors, or None.
    """

    source_type: str
    bits: int
    block_size: int
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    offsets: np.ndarray | None = None
    minimums: np.ndarray | None = None
    five_bit: FiveBitCodes | None = None
    scale_factors: FactoredValues | None = None
    offset_factors: FactoredValues | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    @property
    def zero_point_kind(self) -> str:
        """``"default"``, ``"uint8"`` or ``"float"``."""
        if self.zero_points is None:
            return "default"
        return "float" if self.zero_points.dtype.kind == "f" else "uint8"

    def dequantize(self) -> np.ndarray:
        """Return the float32 ``[N, K]`` matrix these blocks stand for."""
        n, k = self.shape
        blocks = self.codes.reshape(n, k // self.block_size, self.block_size).astype(np.float32)
        zero = self.explicit_zero_points().astype(np.float32)[..., None]
        values = (blocks - zero) * self.scales[..., None]
        if self.offsets is not None:
            values = values + self.offsets[..., None]
        return values.reshape(n, k)

    def explicit_zero_points(self) -> np.ndarray:
        """Return the zero points as an array, the operator default filled in when absent."""
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)

    def select_rows(self, rows: np.ndarray) -> BlockWeight:
        """Return the weight with its output rows reordered (or selected) by ``rows``."""
        zero = None if self.zero_points is None else self.zero_points[rows]
        offsets = None if self.offsets is None else self.offsets[rows]
        minimums = None if self.minimums is None else self.minimums[rows]
        return BlockWeight(
            self.source_type, self.bits, self.block_size, self.codes[rows], self.scales[rows], zero, offsets, minimums,
            five_bit=None if self.five_bit is None else self.five_bit.select_rows(rows),
            scale_factors=None if self.scale_factors is None else self.scale_factors.select_rows(rows),
            offset_factors=None if self.offset_factors is None else self.offset_factors.select_rows(rows),
        )


def _f16(raw: np.ndarray) -> np.ndarray:
    """View two uint8 columns as one float16 column, widened to float32."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Split ``[..., 16]`` packed bytes into 32 codes: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _affine(source_type: str, bits: int, block_size: int, codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> BlockWeight:
    """Build a weight whose blocks read ``value = d * code + m``: zero point 0, offset ``m``."""
    zero_codes = np.zeros(d.shape, dtype=np.uint8)
    return BlockWeight(source_type, bits, block_size, codes, d.astype(np.float32), zero_codes, m.astype(np.float32))


def _blocks(raw: np.ndarray, type_size: int) -> tuple[np.ndarray, int, int]:
    n = raw.shape[0]
    if raw.shape[1] % type_size:
        raise ValueError(f"row of {raw.shape[1]} bytes is not a whole number of {type_size}-byte blocks")
    n_blocks = raw.shape[1] // type_size
    return raw.reshape(n, n_blocks, type_size), n, n_blocks


def decode_q4_0(raw: np.ndarray) -> BlockWeight:
    blocks, n, n_blocks = _blocks(raw, 18)
    d = _f16(blocks[..., 0:2]).reshape(n, n_blocks)
    codes = _nibbles(blocks[..., 2:18]).reshape(n, n_blocks * 32)
    return BlockWeight("Q4_0", 4, 32, codes, d, None)


def decode_q4_1(raw: np.ndarray) -> BlockWeight:
    blocks, n, n_blocks = _blocks(raw, 20)
    d = _f16(blocks[..., 0:2]).reshape(n, n_blocks)
    m = _f16(blocks[..., 2:4]).reshape(n, n_blocks)
    codes = _nibbles(blocks[..., 4:20]).reshape(n, n_blocks * 32)
    return _affine("Q4_1", 4, 32, codes, d, m)


def _high_bits_32(qh_bytes: np.ndarray) -> np.ndarray:
    """Return bit j of the little-endian 32-bit field as the 5th bit of code j."""
    qh = np.ascontiguousarray(qh_bytes).view("<u4")  # [..., 1]
    shifts = np.arange(32, dtype=np.uint32)
    return (((qh >> shifts) & 1) << 4).astype(np.uint8)


def decode_q5_0(raw: np.ndarray) -> BlockWeight:
    blocks, n, n_blocks = _blocks(raw, 22)
    d = _f16(blocks[..., 0:2]).reshape(n, n_blocks)
    five_bit = FiveBitCodes(blocks[..., 6:22], blocks[..., 2:6], shift=112)
    codes = five_bit.unpack().reshape(n, n_blocks * 32)
    # value = d * (q - 16) = d * ((q + 112) - 128), and 128 is the 8-bit default zero point.
    return BlockWeight("Q5_0", 8, 32, codes + np.uint8(112), d, None, five_bit=five_bit)


def decode_q5_1(raw: np.ndarray) -> BlockWeight:
    blocks, n, n_blocks = _blocks(raw, 24)
    d = _f16(blocks[..., 0:2]).reshape(n, n_blocks)
    m = _f16(blocks[..., 2:4]).reshape(n, n_blocks)
    five_bit = FiveBitCodes(blocks[..., 8:24], blocks[..., 4:8], shift=0)
    weight = _affine("Q5_1", 8, 32, five_bit.unpack().reshape(n, n_blocks * 32), d, m)
    weight.five_bit = five_bit
    return weight


def decode_q8_0(raw: np.ndarray) -> BlockWeight:
    blocks, n, n_blocks = _blocks(raw, 34)
    d = _f16(blocks[..., 0:2]).reshape(n, n_blocks)
    # int8 code q becomes uint8 q + 128, and 128 is the 8-bit default zero point.
    codes = (blocks[..., 2:34] ^ 0x80).reshape(n, n_blocks * 32)
    return BlockWeight("Q8_0", 8, 32, codes, d, None)


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12 bytes of 6-bit sub-block scales and minimums of Q4_K and Q5_K.

    Mirrors ggml's ``get_scale_min_k4``. Sub-blocks 0-3 use the low 6 bits of bytes 0-3
    (scales) and 4-7 (minimums). Sub-blocks 4-7 combine a nibble of bytes 8-11 with the
    top 2 bits of bytes 0-7.
    """
    low_scales = packed[..., 0:4] & 63
    low_mins = packed[..., 4:8] & 63
    high_scales = (packed[..., 8:12] & 0x0F) | ((packed[..., 0:4] >> 6) << 4)
    high_mins = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    scales = np.concatenate([low_scales, high_scales], axis=-1).astype(np.float32)
    mins = np.concatenate([low_mins, high_mins], axis=-1).astype(np.float32)
    return scales, mins


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Split ``[..., 128]`` bytes into 256 codes: each 32-byte run holds two sub-blocks."""
    runs = qs.reshape(*qs.shape[:-1], 4, 32)
    return np.stack([runs & 0x0F, runs >> 4], axis=-2).reshape(*qs.shape[:-1], QK_K)


def _k_affine(source_type: str, bits: int, raw: np.ndarray, type_size: int, with_high_bits: bool) -> BlockWeight:
    blocks, n, n_super = _blocks(raw, type_size)
    d = _f16(blocks[..., 0:2])  # [n, n_super, 1]
    dmin = _f16(blocks[..., 2:4])
    sub_scales, sub_mins = _k_scales_mins(blocks[..., 4:16])  # [n, n_super, 8]
    if with_high_bits:
        qh = blocks[..., 16:48]  # bit j of byte l is the 5th bit of value 32*j + l
        qs = blocks[..., 48:176]
        bit_rows = [((qh >> j) & 1) << 4 for j in range(8)]
        high = np.stack(bit_rows, axis=-2).reshape(n, n_super, QK_K)
        codes = _k_nibbles(qs) | high
    else:
        codes = _k_nibbles(blocks[..., 16:144])
    scale = (d * sub_scales).reshape(n, n_super * 8)
    minimum = -(dmin * sub_mins).reshape(n, n_super * 8)
    weight = _affine(source_type, bits, 32, codes.reshape(n, n_super * QK_K).astype(np.uint8), scale, minimum)
    weight.scale_factors = FactoredValues(d[..., 0], sub_scales.reshape(n, n_super * 8).astype(np.uint8))
    weight.offset_factors = FactoredValues(-dmin[..., 0], sub_mins.reshape(n, n_super * 8).astype(np.uint8))
    return weight


def decode_q4_k(raw: np.ndarray) -> BlockWeight:
    return _k_affine("Q4_K", 4, raw, 144, with_high_bits=False)


def decode_q5_k(raw: np.ndarray) -> BlockWeight:
    return _k_affine("Q5_K", 8, raw, 176, with_high_bits=True)


def decode_q6_k(raw: np.ndarray) -> BlockWeight:
    blocks, n, n_super = _blocks(raw, 210)
    ql = blocks[..., 0:128].reshape(n, n_super, 2, 64)
    qh = blocks[..., 128:192].reshape(n, n_super, 2, 32)
    sub_scales = blocks[..., 192:208].view(np.int8).astype(np.float32)  # [n, n_super, 16]
    d = _f16(blocks[..., 208:210])

    # Each 128-value half: values l, l+32, l+64, l+96 (l < 32) take the low nibble of
    # ql[l], ql[l+32], then the high nibbles, each with 2 bits of qh[l] above them.
    low = np.concatenate([ql[..., 0:32] & 0x0F, ql[..., 32:64] & 0x0F, ql[..., 0:32] >> 4, ql[..., 32:64] >> 4], axis=-1)
    high = np.concatenate([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], axis=-1)
    codes = (low | (high << 4)).reshape(n, n_super * QK_K).astype(np.uint8)

    scale = (d * sub_scales).reshape(n, n_super * 16)
    factors = FactoredValues(d[..., 0], sub_scales.reshape(n, n_super * 16).astype(np.int8))
    # value = scale * (q - 32) = scale * ((q + 96) - 128), 128 being the 8-bit default zero point.
    return BlockWeight("Q6_K", 8, 16, codes + np.uint8(96), scale, None, scale_factors=factors)


DECODERS: dict[str, Callable[[np.ndarray], BlockWeight]] = {
    "Q4_0": decode_q4_0,
    "Q4_1": decode_q4_1,
    "Q5_0": decode_q5_0,
    "Q5_1": decode_q5_1,
    "Q8_0": decode_q8_0,
    "Q4_K": decode_q4_k,
    "Q5_K": decode_q5_k,
    "Q6_K": decode_q6_k,
}
SUPPORTED_TYPES = tuple(DECODERS)


def decode(type_name: str, raw: np.ndarray) -> BlockWeight:
    """Decode the raw bytes of a quantized GGUF tensor.

    Args:
        type_name: the GGML type name (``"Q4_K"``).
        raw: uint8 ``[N, bytes_per_row]`` as ``gguf.GGUFReader`` returns it.

    Returns:
        The weight as ``MatMulNBits`` codes, scales and zero points.

    Raises:
        KeyError: no decoder exists for ``type_name``; see ``SUPPORTED_TYPES``.
    """
    return DECODERS[type_name](np.asarray(raw, dtype=np.uint8))


def pack_codes(weight: BlockWeight) -> np.ndarray:
    """Return the ``MatMulNBits`` input B: uint8 ``[N, K // block_size, block_size * bits // 8]``."""
    n, k = weight.shape
    codes = weight.codes.reshape(n, k // weight.block_size, weight.block_size)
    if weight.bits == 8:
        return np.ascontiguousarray(codes)
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4))


def pack_zero_points(weight: BlockWeight) -> np.ndarray | None:
    """Return the ``MatMulNBits`` zero points input, or None to use the default.

    Float zero points stay ``[N, n_blocks]``; 4-bit integer ones are packed two per byte
    along the blocks of a row (low nibble first, rows padded to whole bytes).
    """
    zero = weight.zero_points
    if zero is None or zero.dtype.kind == "f" or weight.bits == 8:
        return zero
    n, n_blocks = zero.shape
    if n_blocks % 2:
        zero = np.concatenate([zero, np.zeros((n, 1), dtype=np.uint8)], axis=1)
    return np.ascontiguousarray(zero[:, 0::2] | (zero[:, 1::2] << 4))
