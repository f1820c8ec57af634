//! Stored dtypes and their decoding to f32.
//!
//! Every float format is decoded to f32 before any arithmetic (sums are then taken in f64 by the
//! metrics). Conversions: bf16 → f32 is `(bits as u32) << 16`, exact; f16 via the `half` crate
//! (F16C when the CPU has it), exact; f64 → f32 rounds to nearest. FP8 E4M3FN and E5M2 go through a
//! 256-entry table built from the OCP 8-bit float spec (v1.0, 2023), then a scale
//! (see [`crate::source::Encoding`]); MXFP4 (OCP MX spec v1.0) is E2M1 codes, two per byte with the
//! low nibble first, times an E8M0 power-of-two scale per 32 elements.

use std::fmt;
use std::sync::OnceLock;

/// A dtype string of the safetensors format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    /// Boolean, one byte.
    Bool,
    /// Unsigned 8-bit integer (also the container of MXFP4 blocks and scales).
    U8,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 16-bit integer.
    U16,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 32-bit integer.
    U32,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 64-bit integer.
    U64,
    /// Signed 64-bit integer.
    I64,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
    /// 8-bit float E4M3 (finite-only "FN" variant, as torch.float8_e4m3fn).
    F8E4M3,
    /// 8-bit float E5M2 (IEEE-like, with inf and NaN).
    F8E5M2,
    /// 8-bit power-of-two scale (OCP MX E8M0).
    F8E8M0,
    /// 4-bit float E2M1, packed two per byte.
    F4,
    /// 6-bit float E2M3.
    F6E2M3,
    /// 6-bit float E3M2.
    F6E3M2,
    /// Complex64 (two f32).
    C64,
    /// 8-bit float E4M3 "FNUZ" (AMD/Graphcore: bias 8, no inf, no negative zero; 0x80 is NaN).
    F8E4M3Fnuz,
    /// 8-bit float E5M2 "FNUZ" (bias 16, no inf, no negative zero; 0x80 is NaN).
    F8E5M2Fnuz,
}

/// How the metrics treat a dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeClass {
    /// Decoded to f32 directly.
    Float,
    /// 8-bit float codes that need a scale tensor before they mean anything.
    ScaledFloat8,
    /// Integer or boolean: listed, never analysed.
    Integer,
    /// A float format this version cannot decode on its own (listed and skipped with a note).
    Unsupported,
}

impl Dtype {
    /// Parse a safetensors dtype string; `None` for an unknown string.
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "U16" => Dtype::U16,
            "I16" => Dtype::I16,
            "U32" => Dtype::U32,
            "I32" => Dtype::I32,
            "U64" => Dtype::U64,
            "I64" => Dtype::I64,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "F32" => Dtype::F32,
            "F64" => Dtype::F64,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::F8E5M2,
            "F8_E8M0" => Dtype::F8E8M0,
            "F4" => Dtype::F4,
            "F6_E2M3" => Dtype::F6E2M3,
            "F6_E3M2" => Dtype::F6E3M2,
            "C64" => Dtype::C64,
            // Known to the reference since safetensors 0.6; listed and skipped here.
            "F8_E4M3FNUZ" => Dtype::F8E4M3Fnuz,
            "F8_E5M2FNUZ" => Dtype::F8E5M2Fnuz,
            _ => return None,
        })
    }

    /// The safetensors spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::U16 => "U16",
            Dtype::I16 => "I16",
            Dtype::U32 => "U32",
            Dtype::I32 => "I32",
            Dtype::U64 => "U64",
            Dtype::I64 => "I64",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::F4 => "F4",
            Dtype::F6E2M3 => "F6_E2M3",
            Dtype::F6E3M2 => "F6_E3M2",
            Dtype::C64 => "C64",
            Dtype::F8E4M3Fnuz => "F8_E4M3FNUZ",
            Dtype::F8E5M2Fnuz => "F8_E5M2FNUZ",
        }
    }

    /// Storage size of one element, in bits.
    pub fn bits(self) -> u64 {
        match self {
            Dtype::F4 => 4,
            Dtype::F6E2M3 | Dtype::F6E3M2 => 6,
            Dtype::Bool
            | Dtype::U8
            | Dtype::I8
            | Dtype::F8E4M3
            | Dtype::F8E5M2
            | Dtype::F8E8M0
            | Dtype::F8E4M3Fnuz
            | Dtype::F8E5M2Fnuz => 8,
            Dtype::U16 | Dtype::I16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 32,
            Dtype::U64 | Dtype::I64 | Dtype::F64 | Dtype::C64 => 64,
        }
    }

    /// How the metrics treat this dtype.
    pub fn class(self) -> DtypeClass {
        match self {
            Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64 => DtypeClass::Float,
            Dtype::F8E4M3 | Dtype::F8E5M2 => DtypeClass::ScaledFloat8,
            Dtype::Bool
            | Dtype::U8
            | Dtype::I8
            | Dtype::U16
            | Dtype::I16
            | Dtype::U32
            | Dtype::I32
            | Dtype::U64
            | Dtype::I64 => DtypeClass::Integer,
            Dtype::F8E8M0
            | Dtype::F4
            | Dtype::F6E2M3
            | Dtype::F6E3M2
            | Dtype::C64
            | Dtype::F8E4M3Fnuz
            | Dtype::F8E5M2Fnuz => DtypeClass::Unsupported,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decode `out.len()` little-endian elements of a plain float dtype from `bytes` into `out`.
///
/// `bytes` must hold exactly `out.len()` elements; the caller guarantees `dtype.class() == Float`
/// or an 8-bit float (then the raw code value is returned, unscaled).
pub fn decode_plain(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::BF16 => decode_bf16(bytes, out),
        Dtype::F16 => {
            // Stage through u16 so `half` can use its F16C path on the whole slice.
            let mut tmp = [0u16; 1024];
            for (o, b) in out.chunks_mut(1024).zip(bytes.chunks(2048)) {
                let t = &mut tmp[..o.len()];
                for (x, c) in t.iter_mut().zip(b.chunks_exact(2)) {
                    *x = u16::from_le_bytes([c[0], c[1]]);
                }
                use half::slice::HalfFloatSliceExt;
                let h: &[half::f16] = half::slice::HalfBitsSliceExt::reinterpret_cast(&*t);
                h.convert_to_f32_slice(o);
            }
        }
        Dtype::F32 => decode_f32(bytes, out),
        Dtype::F64 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(b.try_into().expect("chunks_exact(8)")) as f32;
            }
        }
        Dtype::F8E4M3 | Dtype::F8E5M2 => {
            let lut = fp8_table(dtype);
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = lut[b as usize];
            }
        }
        other => unreachable!("decode_plain called with non-float dtype {other}"),
    }
}

#[inline(always)]
fn decode_bf16_body(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
}

crate::simd::dispatch! {
    fn decode_bf16(bytes: &[u8], out: &mut [f32]) = decode_bf16_body;
}

#[inline(always)]
fn decode_f32_body(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

crate::simd::dispatch! {
    fn decode_f32(bytes: &[u8], out: &mut [f32]) = decode_f32_body;
}

/// bfloat16 bit patterns (e.g. a numpy `uint16` view of a torch bf16 tensor) → f32, exactly.
pub fn bf16_bits_to_f32(bits: &[u16], out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(bits) {
        *o = f32::from_bits((b as u32) << 16);
    }
}

/// The 256-entry value table of an 8-bit float format.
pub fn fp8_table(dtype: Dtype) -> &'static [f32; 256] {
    static E4M3: OnceLock<[f32; 256]> = OnceLock::new();
    static E5M2: OnceLock<[f32; 256]> = OnceLock::new();
    match dtype {
        Dtype::F8E4M3 => E4M3.get_or_init(|| build_fp8_table(4, 3, true)),
        Dtype::F8E5M2 => E5M2.get_or_init(|| build_fp8_table(5, 2, false)),
        other => unreachable!("no fp8 table for {other}"),
    }
}

/// Build the table for a 1-sign, `e`-exponent, `m`-mantissa format. `finite_only` selects the
/// OCP "FN" convention (E4M3: only S.1111.111 is NaN, no infinities); otherwise IEEE-like.
fn build_fp8_table(e: u32, m: u32, finite_only: bool) -> [f32; 256] {
    let bias = (1i32 << (e - 1)) - 1;
    let max_exp = (1u32 << e) - 1;
    let mut t = [0f32; 256];
    for (code, slot) in t.iter_mut().enumerate() {
        let code = code as u32;
        let sign = if code >> 7 == 1 { -1.0f64 } else { 1.0 };
        let exp = (code >> m) & max_exp;
        let man = code & ((1 << m) - 1);
        let v = if finite_only {
            if exp == max_exp && man == (1 << m) - 1 {
                f64::NAN
            } else if exp == 0 {
                man as f64 / (1u32 << m) as f64 * 2f64.powi(1 - bias)
            } else {
                (1.0 + man as f64 / (1u32 << m) as f64) * 2f64.powi(exp as i32 - bias)
            }
        } else if exp == max_exp {
            if man == 0 {
                f64::INFINITY
            } else {
                f64::NAN
            }
        } else if exp == 0 {
            man as f64 / (1u32 << m) as f64 * 2f64.powi(1 - bias)
        } else {
            (1.0 + man as f64 / (1u32 << m) as f64) * 2f64.powi(exp as i32 - bias)
        };
        *slot = (sign * v) as f32;
    }
    t
}

/// E2M1 (FP4) code → value, sign in bit 3 (OCP MX v1.0 table).
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// E8M0 scale byte → 2^(s − 127); 255 is NaN.
pub fn e8m0_to_f32(s: u8) -> f32 {
    if s == 255 {
        f32::NAN
    } else if s == 0 {
        // 2^-127 is an f32 subnormal.
        f32::from_bits(1 << 22)
    } else {
        f32::from_bits((s as u32) << 23)
    }
}

/// Decode MXFP4 elements. `blocks` holds packed E2M1 codes (low nibble = even element), `scales`
/// one E8M0 byte per 32 elements; `out.len()` must be a multiple of 32 and match both slices.
pub fn decode_mxfp4(blocks: &[u8], scales: &[u8], out: &mut [f32]) {
    for ((o, b), &s) in out
        .chunks_exact_mut(32)
        .zip(blocks.chunks_exact(16))
        .zip(scales)
    {
        let scale = e8m0_to_f32(s);
        for (pair, &byte) in o.chunks_exact_mut(2).zip(b) {
            pair[0] = E2M1_VALUES[(byte & 0x0f) as usize] * scale;
            pair[1] = E2M1_VALUES[(byte >> 4) as usize] * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every dtype string the reference `safetensors` 0.8 knows parses, round-trips, and has the
    /// reference's bit size.
    #[test]
    fn reference_dtype_strings() {
        let reference = [
            ("BOOL", 8),
            ("F4", 4),
            ("F6_E2M3", 6),
            ("F6_E3M2", 6),
            ("U8", 8),
            ("I8", 8),
            ("F8_E5M2", 8),
            ("F8_E4M3", 8),
            ("F8_E8M0", 8),
            ("F8_E4M3FNUZ", 8),
            ("F8_E5M2FNUZ", 8),
            ("I16", 16),
            ("U16", 16),
            ("F16", 16),
            ("BF16", 16),
            ("I32", 32),
            ("U32", 32),
            ("F32", 32),
            ("C64", 64),
            ("F64", 64),
            ("I64", 64),
            ("U64", 64),
        ];
        for (s, bits) in reference {
            let d = Dtype::parse(s).unwrap_or_else(|| panic!("{s} not parsed"));
            assert_eq!((d.as_str(), d.bits()), (s, bits));
        }
        assert_eq!(
            Dtype::parse("F8_E4M3FNUZ").unwrap().class(),
            DtypeClass::Unsupported
        );
        for s in ["f32", "F8_E4M3FN", "I4", "C128", ""] {
            assert!(Dtype::parse(s).is_none(), "{s}");
        }
    }

    #[test]
    fn e4m3_known_values() {
        let t = fp8_table(Dtype::F8E4M3);
        assert_eq!(t[0x00], 0.0);
        assert_eq!(t[0x38], 1.0); // exp 7 = bias
        assert_eq!(t[0x7e], 448.0); // max finite
        assert!(t[0x7f].is_nan());
        assert!(t[0xff].is_nan());
        assert_eq!(t[0x01], 2f32.powi(-9)); // smallest subnormal
        assert_eq!(t[0xb8], -1.0);
        assert!(t.iter().all(|v| !v.is_infinite()));
    }

    #[test]
    fn e5m2_known_values() {
        let t = fp8_table(Dtype::F8E5M2);
        assert_eq!(t[0x3c], 1.0);
        assert_eq!(t[0x7b], 57344.0);
        assert_eq!(t[0x7c], f32::INFINITY);
        assert!(t[0x7d].is_nan());
        assert_eq!(t[0x01], 2f32.powi(-16));
    }

    #[test]
    fn e8m0() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(128), 2.0);
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert!(e8m0_to_f32(255).is_nan());
    }

    #[test]
    fn bf16_and_f16_roundtrip() {
        let vals = [1.5f32, -2.0, 0.0, 65504.0, 1e-3];
        let mut bytes = Vec::new();
        for v in vals {
            bytes.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
        }
        let mut out = [0f32; 5];
        decode_plain(Dtype::F16, &bytes, &mut out);
        for (a, b) in out.iter().zip(vals) {
            assert_eq!(*a, half::f16::from_f32(b).to_f32());
        }
        let mut bytes = Vec::new();
        for v in vals {
            bytes.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
        }
        decode_plain(Dtype::BF16, &bytes, &mut out);
        for (a, b) in out.iter().zip(vals) {
            assert_eq!(*a, half::bf16::from_f32(b).to_f32());
        }
    }

    #[test]
    fn mxfp4_nibble_order() {
        let mut blocks = [0u8; 16];
        blocks[0] = 0x21; // element 0 = code 1 (0.5), element 1 = code 2 (1.0)
        let mut out = [0f32; 32];
        decode_mxfp4(&blocks, &[128], &mut out);
        assert_eq!(out[0], 1.0);
        assert_eq!(out[1], 2.0);
        assert!(out[2..].iter().all(|&v| v == 0.0));
    }
}
