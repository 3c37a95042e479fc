"""JPEG Lossless, non-hierarchical, first-order prediction (process 14, selection value 1): the
transfer syntax 1.2.840.10008.1.2.4.70 of the real data, which pydicom cannot encode. Pure numpy."""

from __future__ import annotations

import numpy as np

# The Huffman table found in the real COVID-CT-MD files: number of codes of each length 1..16, and
# the SSSS categories (bit length of the prediction difference, 0..16) in code order.
_HUFF_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0)
_HUFF_VALUES = tuple(range(17))


def _huffman_codes() -> tuple[np.ndarray, np.ndarray]:
    """Canonical codes (ITU T.81 Annex C) for the categories: int64 (17,) codes and lengths."""
    codes, lengths = np.zeros(17, dtype=np.int64), np.zeros(17, dtype=np.int64)
    code, k = 0, 0
    for length, count in enumerate(_HUFF_BITS, start=1):
        for _ in range(count):
            codes[_HUFF_VALUES[k]], lengths[_HUFF_VALUES[k]] = code, length
            code, k = code + 1, k + 1
        code <<= 1
    return codes, lengths


_HUFF_CODES, _HUFF_LENGTHS = _huffman_codes()


def encode_jpeg_lossless(pixels: np.ndarray) -> bytes:
    """Encode a uint16 (rows, cols) image as a JPEG lossless SV1 codestream (SOF3, precision 16,
    one component, predictor 1 = left neighbour, point transform 0), the encoding of transfer
    syntax 1.2.840.10008.1.2.4.70. int16 input is encoded by its 16-bit pattern. Pure numpy."""
    if pixels.ndim != 2 or pixels.dtype not in (np.uint16, np.int16):
        raise ValueError(f"expected a uint16 or int16 (rows, cols) array, got {pixels.dtype} {pixels.shape}")
    x = pixels.view(np.uint16).astype(np.int32)
    predicted = np.empty_like(x)
    predicted[0, 0] = 1 << 15  # 2**(P-1)
    predicted[0, 1:] = x[0, :-1]  # first row: left
    predicted[1:, 0] = x[:-1, 0]  # first column: above
    predicted[1:, 1:] = x[1:, :-1]  # elsewhere: left (selection value 1)
    diff = ((x - predicted + 32768) & 0xFFFF) - 32768  # modulo 2**16, in [-32768, 32767]
    ssss = np.frexp(np.abs(diff).astype(np.float64))[1].astype(np.int64)  # bit length of |diff|
    n_extra = np.where(ssss == 16, 0, ssss)  # category 16 (diff 32768) has no extra bits
    extra = np.where(diff < 0, diff - 1, diff) & ((1 << n_extra) - 1)  # negative: one's complement
    values = (_HUFF_CODES[ssss] << n_extra) | extra
    scan = _pack_bits(values.ravel(), (_HUFF_LENGTHS[ssss] + n_extra).ravel())
    rows, cols = pixels.shape
    dht = bytes([0x00, *_HUFF_BITS, *_HUFF_VALUES])  # class 0 (DC / lossless), table 0
    sof3 = bytes([16, rows >> 8, rows & 0xFF, cols >> 8, cols & 0xFF, 1, 1, 0x11, 0])
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # 1 component, table 0, Ss = predictor 1, Se = 0, Ah/Al = 0
    return b"\xff\xd8" + _segment(0xC4, dht) + _segment(0xC3, sof3) + _segment(0xDA, sos) + scan + b"\xff\xd9"


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _pack_bits(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate variable-length codes (values < 2**32, MSB first, each ``lengths`` bits long),
    pad with 1-bits to a byte, and stuff a 0x00 after every 0xFF byte."""
    words = np.unpackbits(values.astype(">u4").view(np.uint8).reshape(-1, 4), axis=1)  # (N, 32) bits
    bits = words[np.arange(32) >= 32 - lengths[:, None]]  # the last lengths[i] bits of each row
    data = np.packbits(np.concatenate([bits, np.ones(-len(bits) % 8, dtype=np.uint8)]))
    return np.insert(data, np.flatnonzero(data == 0xFF) + 1, 0).tobytes()
