//! A minimal safetensors writer for tests (written here, independent of the reader under test).

#![allow(dead_code)]

use std::path::Path;

/// (name, dtype, shape, raw little-endian bytes)
pub type T = (String, &'static str, Vec<u64>, Vec<u8>);

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
        .collect()
}

pub fn write(path: &Path, tensors: &[T]) {
    let mut header = String::from("{");
    let mut off = 0usize;
    for (i, (name, dtype, shape, data)) in tensors.iter().enumerate() {
        if i > 0 {
            header.push(',');
        }
        let shape: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            "{}:{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
            serde_json::to_string(name).unwrap(),
            shape.join(","),
            off + data.len()
        ));
        off += data.len();
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for (_, _, _, d) in tensors {
        out.extend_from_slice(d);
    }
    std::fs::write(path, out).unwrap();
}

/// Write `tensors` as `n` shards plus `model.safetensors.index.json` in `dir`.
pub fn write_sharded(dir: &Path, tensors: &[T], n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let per = tensors.len().div_ceil(n);
    let mut map = serde_json::Map::new();
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let fname = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        write(&dir.join(&fname), chunk);
        for t in chunk {
            map.insert(t.0.clone(), serde_json::Value::String(fname.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// Deterministic pseudo-random values (xorshift), no extra dependency.
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
