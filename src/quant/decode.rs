//! Bit-exact decoding of the quantized element and scale codes of DESIGN.md section 4. Every
//! function returns the value as an f32 (each is exactly representable there), so the GPU
//! kernels, which decode in f32, and the f64 reference see the same numbers.

/// float8_e4m3fn (`torch.float8_e4m3fn`, OCP E4M3): sign bit 7, exponent bits 6..3 (bias 7),
/// mantissa bits 2..0; exponent 0 is subnormal (`m / 8 · 2^-6`); `S.1111.111` (0x7F, 0xFF) is
/// NaN; there are no infinities (`S.1111.110` = ±448 is the largest finite value).
pub fn e4m3(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = (code >> 3) & 0xF;
    let man = code & 0x7;
    if exp == 0xF && man == 0x7 {
        return f32::NAN;
    }
    let mag = if exp == 0 {
        f32::from(man) * (1.0 / 512.0)
    } else {
        // (1 + m/8) · 2^(e-7), built from its f32 bits: exact for every normal code.
        f32::from_bits(((u32::from(exp) + 120) << 23) | (u32::from(man) << 20))
    };
    sign * mag
}

/// The magnitudes of e2m1 (FP4, OCP MX): codes 0..7.
pub const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// An e2m1 nibble (bits 3..0; bit 3 is the sign): `±E2M1[code & 7]`. `0b1000` is −0.
pub fn e2m1(nibble: u8) -> f32 {
    let mag = E2M1[usize::from(nibble & 7)];
    if nibble & 8 != 0 {
        -mag
    } else {
        mag
    }
}

/// The f32 bits of the e8m0 scale `2^(code − 127)`: codes 1..=254 are normal f32 numbers,
/// code 0 is the subnormal 2^-127. Code 255 (NaN in the OCP MX spec) gives +inf: transformers
/// (`convert_moe_packed_tensors`, `torch.ldexp`) multiplies the e2m1 value by `2.0 ** 128`,
/// which is inf in f32, so a block with scale 255 decodes to ±inf, and to NaN where the
/// nibble is ±0 — we follow it.
pub fn e8m0_bits(code: u8) -> u32 {
    match code {
        0 => 0x0040_0000,
        255 => 0x7F80_0000,
        c => u32::from(c) << 23,
    }
}

/// The e8m0 scale `2^(code − 127)` (see [`e8m0_bits`]).
pub fn e8m0(code: u8) -> f32 {
    f32::from_bits(e8m0_bits(code))
}

/// An MXFP4 weight: the e2m1 nibble times its block's e8m0 scale, computed in f32 as the
/// kernels and transformers do. Exact wherever the product is within f32's range; beyond it
/// (|W| ≥ 2^128: scale 254 with |e2m1| ≥ 2, 253 with ≥ 4, and 255) it is ±inf, and NaN for
/// ±0 at scale 255 — what transformers' f32 / bf16 dequantization gives too.
pub fn mxfp4(nibble: u8, scale: u8) -> f32 {
    e2m1(nibble) * e8m0(scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_table_matches_the_format_definition() {
        // Independent definition: value = (-1)^s · 2^(e-7) · (1 + m/8), or 2^-6 · m/8 at e = 0.
        for code in 0u16..=255 {
            let c = code as u8;
            let (s, e, m) = (c >> 7, (c >> 3) & 15, c & 7);
            let v = e4m3(c);
            if e == 15 && m == 7 {
                assert!(v.is_nan(), "{c:#04x}");
                continue;
            }
            let mag = if e == 0 {
                2f64.powi(-6) * f64::from(m) / 8.0
            } else {
                2f64.powi(i32::from(e) - 7) * (1.0 + f64::from(m) / 8.0)
            };
            let want = if s == 1 { -mag } else { mag };
            assert_eq!(f64::from(v), want, "{c:#04x}");
        }
        assert_eq!(e4m3(0x7E), 448.0);
        assert_eq!(e4m3(0x01), 2f32.powi(-9));
        assert_eq!(e4m3(0x80).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn e2m1_and_e8m0_tables() {
        let want = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for n in 0u8..16 {
            let w = want[usize::from(n & 7)];
            assert_eq!(e2m1(n), if n >= 8 { -w } else { w }, "{n}");
        }
        for c in 0u8..=254 {
            assert_eq!(f64::from(e8m0(c)), 2f64.powi(i32::from(c) - 127), "{c}");
        }
        assert_eq!(e8m0(255), f32::INFINITY);
        assert!(mxfp4(0, 255).is_nan());
        assert_eq!(mxfp4(1, 255), f32::INFINITY);
        assert_eq!(mxfp4(9, 0), -(2f32.powi(-128)));
    }
}
