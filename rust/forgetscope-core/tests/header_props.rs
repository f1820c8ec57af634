//! Property tests: write → read round trips over dtypes and shapes, and arbitrary bytes never panic.

mod common;

use forgetscope_core::source::file::open_regular;
use forgetscope_core::source::header::read_header;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn roundtrip(shapes in prop::collection::vec(prop::collection::vec(0u64..5, 0..4), 1..6), dt in 0usize..4) {
        let dtypes = [("F32", 4u64), ("BF16", 2), ("F16", 2), ("F64", 8)];
        let (d, size) = dtypes[dt];
        let tensors: Vec<common::T> = shapes.iter().enumerate().map(|(i, s)| {
            let n: u64 = s.iter().product();
            (format!("t{i}"), d, s.clone(), vec![7u8; (n * size) as usize])
        }).collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        common::write(&p, &tensors);
        let (f, id) = open_regular(&p).unwrap();
        let h = read_header(&f, &p, id).unwrap();
        prop_assert_eq!(h.tensors.len(), tensors.len());
        for t in &h.tensors {
            let orig = tensors.iter().find(|o| o.0 == t.name).unwrap();
            prop_assert_eq!(&t.shape, &orig.2);
            prop_assert_eq!(t.len, orig.3.len() as u64);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), len in prop::option::of(0u64..300)) {
        let mut data = bytes.clone();
        if let Some(l) = len {
            if data.len() >= 8 { data[..8].copy_from_slice(&l.to_le_bytes()); }
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        std::fs::write(&p, &data).unwrap();
        let (f, id) = open_regular(&p).unwrap();
        let _ = read_header(&f, &p, id);
    }

    #[test]
    fn mutated_valid_headers_never_panic(pos in 8usize..120, byte in any::<u8>()) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        common::write(&p, &[("a".into(), "F32", vec![2, 2], vec![0u8; 16]), ("b".into(), "BF16", vec![3], vec![0u8; 6])]);
        let mut data = std::fs::read(&p).unwrap();
        if pos < data.len() { data[pos] = byte; }
        std::fs::write(&p, &data).unwrap();
        let (f, id) = open_regular(&p).unwrap();
        let _ = read_header(&f, &p, id);
    }
}
