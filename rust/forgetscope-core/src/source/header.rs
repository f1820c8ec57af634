//! Parse and validate one safetensors file's header.
//!
//! Format (safetensors v0.4+): u64 little-endian header length N, then N bytes of UTF-8 JSON object
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`, then the data
//! section. We accept what the reference `safetensors` crate accepts, except where we are stricter
//! on purpose (see `docs/validation.md`): duplicate tensor names are rejected (serde would keep the
//! last), and a shape whose non-zero dimensions overflow u64 is rejected whatever the order of
//! its dimensions.
//!
//! Every size is checked before it is used to allocate: the header length against the file size
//! and a 100 MB cap (the reference's limit), and every offset against the data section.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::path::Path;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::file::{read_exact_at, FileIdentity};
use super::sniff::foreign_format;
use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// Largest header accepted, as in the reference implementation.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Most tensor entries accepted in one file. The reference has no such limit; we do because each
/// listed tensor costs about a kilobyte downstream, and Rust aborts (it cannot raise) when an
/// allocation fails, so a 100 MB header of 1.7 million empty entries would otherwise take the
/// process down under a memory limit instead of failing with a message. Real shards hold a few
/// thousand tensors; the largest single-file MoE checkpoints we know of, under 100 thousand.
pub const MAX_TENSORS_PER_FILE: usize = 200_000;

/// One tensor entry of a validated header.
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// Name, exactly as stored.
    pub name: String,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// Number of elements (product of the shape).
    pub numel: u64,
    /// Absolute byte offset of the first byte in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Tensors in file order (ascending offset).
    pub tensors: Vec<RawTensor>,
    /// `__metadata__`, if present.
    pub metadata: Vec<(String, String)>,
    /// Absolute offset of the data section.
    pub data_start: u64,
}

/// Read and validate the header of an already-opened regular file.
pub fn read_header(file: &File, path: &Path, id: FileIdentity) -> Result<Header> {
    let file_len = id.len();
    let mut head = [0u8; 64];
    let n_head = (file_len.min(64)) as usize;
    read_exact_at(file, path, &mut head[..n_head], 0)?;
    let head = &head[..n_head];
    let explain = |reason: String| -> Error {
        match foreign_format(head, file_len) {
            Some(what) => Error::ForeignFormat {
                path: path.to_path_buf(),
                what,
            },
            None => Error::header(path, reason),
        }
    };
    if file_len < 8 {
        return Err(explain(format!(
            "file is {file_len} bytes, too short for the 8-byte header length"
        )));
    }
    let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return Err(explain(format!(
            "declared header length {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit"
        )));
    }
    if n > file_len - 8 {
        return Err(explain(format!(
            "declared header length {n} bytes runs past the end of the file ({file_len} bytes); truncated file?"
        )));
    }
    if n < 2 {
        return Err(explain(format!(
            "declared header length {n} is too short for a JSON object"
        )));
    }
    if head.len() > 8 && head[8] != b'{' {
        return Err(explain("header does not start with '{'".into()));
    }
    // The one allocation sized from the file: fallible, so a process short of address space
    // gets an error naming the file instead of an abort.
    let mut buf = Vec::new();
    buf.try_reserve_exact(n as usize).map_err(|_| {
        Error::header(
            path,
            format!("cannot allocate {n} bytes to read the header (out of memory)"),
        )
    })?;
    buf.resize(n as usize, 0);
    read_exact_at(file, path, &mut buf, 8)?;
    let text = std::str::from_utf8(&buf).map_err(|e| {
        Error::header(
            path,
            format!(
                "header is not valid UTF-8 (at byte {})",
                8 + e.valid_up_to()
            ),
        )
    })?;
    let parsed = parse_json(text).map_err(|e| match e.tensor {
        Some(name) => Error::tensor(path, name, e.reason),
        None => Error::header(path, e.reason),
    })?;
    validate(path, parsed, 8 + n, file_len)
}

/// The JSON shape of a header before semantic validation.
struct ParsedHeader {
    entries: Vec<(String, Entry)>,
    metadata: Vec<(String, String)>,
}

/// One tensor entry. Deserialized by hand, not derived, so that unknown fields are parsed the way
/// the reference parses them: it buffers them as JSON values, so a number out of f64 range or
/// nesting past serde_json's recursion limit is an error there, and must be one here too
/// (`IgnoredAny`, which a derive uses, skips both unchecked).
struct Entry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

struct Shape(Vec<u64>);
struct Offsets((u64, u64));

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        de_u64_list(d, "shape").map(Shape)
    }
}

impl<'de> Deserialize<'de> for Offsets {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        de_offsets(d).map(Offsets)
    }
}

const ENTRY_FIELDS: &[&str] = &["dtype", "shape", "data_offsets"];

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_struct("Entry", ENTRY_FIELDS, EntryVisitor)
    }
}

struct EntryVisitor;

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = Entry;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object {\"dtype\", \"shape\", \"data_offsets\"}")
    }

    // The positional form [dtype, shape, data_offsets]: serde's derive (and so the reference)
    // accepts it.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Entry, A::Error> {
        let dtype = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &self))?;
        let Shape(shape) = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(1, &self))?;
        let Offsets(data_offsets) = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(2, &self))?;
        Ok(Entry {
            dtype,
            shape,
            data_offsets,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Entry, A::Error> {
        let (mut dtype, mut shape, mut offsets) = (None, None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "dtype" if dtype.is_some() => return Err(de::Error::duplicate_field("dtype")),
                "dtype" => dtype = Some(map.next_value::<String>()?),
                "shape" if shape.is_some() => return Err(de::Error::duplicate_field("shape")),
                "shape" => shape = Some(map.next_value::<Shape>()?.0),
                "data_offsets" if offsets.is_some() => {
                    return Err(de::Error::duplicate_field("data_offsets"))
                }
                "data_offsets" => offsets = Some(map.next_value::<Offsets>()?.0),
                _ => {
                    map.next_value::<CheckedSkip>()?;
                }
            }
        }
        Ok(Entry {
            dtype: dtype.ok_or_else(|| de::Error::missing_field("dtype"))?,
            shape: shape.ok_or_else(|| de::Error::missing_field("shape"))?,
            data_offsets: offsets.ok_or_else(|| de::Error::missing_field("data_offsets"))?,
        })
    }
}

/// Skips a JSON value as a buffering parser would read it: numbers are converted (`1e400` is out
/// of range) and nesting counts against serde_json's recursion limit.
struct CheckedSkip;

impl<'de> Deserialize<'de> for CheckedSkip {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(CheckedSkip)
    }
}

impl<'de> Visitor<'de> for CheckedSkip {
    type Value = CheckedSkip;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Self, A::Error> {
        while seq.next_element::<CheckedSkip>()?.is_some() {}
        Ok(self)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self, A::Error> {
        while map.next_entry::<CheckedSkip, CheckedSkip>()?.is_some() {}
        Ok(self)
    }
}

fn de_u64_list<'de, D: de::Deserializer<'de>>(
    d: D,
    what: &str,
) -> std::result::Result<Vec<u64>, D::Error> {
    let v: Vec<serde_json::Number> = Deserialize::deserialize(d).map_err(|_| {
        de::Error::custom(format!("{what} must be a list of non-negative integers"))
    })?;
    v.iter()
        .map(|n| {
            n.as_u64().ok_or_else(|| {
                de::Error::custom(format!(
                    "{what} entry {n} is not a non-negative integer below 2^64"
                ))
            })
        })
        .collect()
}

fn de_offsets<'de, D: de::Deserializer<'de>>(d: D) -> std::result::Result<(u64, u64), D::Error> {
    match de_u64_list(d, "data_offsets")?[..] {
        [a, b] => Ok((a, b)),
        ref other => Err(de::Error::custom(format!(
            "data_offsets must be [begin, end], found {} numbers",
            other.len()
        ))),
    }
}

/// A parse failure, with the tensor whose entry was being read (if any).
struct ParseError {
    tensor: Option<String>,
    reason: String,
}

fn parse_json(text: &str) -> std::result::Result<ParsedHeader, ParseError> {
    let current = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = HeaderSeed { current: &current }
        .deserialize(&mut de)
        .map_err(|e| ParseError {
            tensor: current.borrow_mut().take(),
            reason: e.to_string(),
        })?;
    // Trailing bytes: the reference pads with spaces; anything else is an error.
    de.end().map_err(|e| ParseError {
        tensor: None,
        reason: format!("unexpected data after the JSON object: {e}"),
    })?;
    Ok(parsed)
}

/// Remembers which tensor's entry is being parsed, so a failure can name it.
struct HeaderSeed<'a> {
    current: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for HeaderSeed<'_> {
    type Value = ParsedHeader;
    fn deserialize<D: de::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(HeaderVisitor {
            current: self.current,
        })
    }
}

struct HeaderVisitor<'a> {
    current: &'a RefCell<Option<String>>,
}

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = ParsedHeader;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object mapping tensor names to {dtype, shape, data_offsets}")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        let mut seen = HashSet::new();
        let mut metadata = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "__metadata__" {
                if metadata.is_some() {
                    return Err(de::Error::custom("duplicate key \"__metadata__\""));
                }
                metadata = Some(map.next_value_seed(StringMapSeed)?);
                continue;
            }
            *self.current.borrow_mut() = Some(key.clone());
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(
                    "duplicate tensor name (each name must appear once)",
                ));
            }
            if entries.len() == MAX_TENSORS_PER_FILE {
                return Err(de::Error::custom(format!(
                    "more than {MAX_TENSORS_PER_FILE} tensors in one file (a limit of forgetscope, \
                     not of the format: see docs/validation.md)"
                )));
            }
            let entry: Entry = map.next_value()?;
            entries.push((key, entry));
            *self.current.borrow_mut() = None;
        }
        Ok(ParsedHeader {
            entries,
            metadata: metadata.unwrap_or_default(),
        })
    }
}

/// `__metadata__` must be a string → string object; duplicates rejected like tensor names.
struct StringMapSeed;

impl<'de> DeserializeSeed<'de> for StringMapSeed {
    type Value = Vec<(String, String)>;
    fn deserialize<D: de::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<(String, String)>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"__metadata__\" as an object of string values")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                let mut seen = HashSet::new();
                while let Some(k) = map.next_key::<String>()? {
                    if !seen.insert(k.clone()) {
                        return Err(de::Error::custom(format!(
                            "duplicate \"__metadata__\" key {k:?}"
                        )));
                    }
                    match map.next_value::<serde_json::Value>()? {
                        serde_json::Value::String(v) => out.push((k, v)),
                        other => {
                            return Err(de::Error::custom(format!(
                                "\"__metadata__\" value of {k:?} must be a string, found {other}"
                            )))
                        }
                    }
                }
                Ok(out)
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Err(de::Error::custom(
                    "\"__metadata__\" must be an object, found an array",
                ))
            }
        }
        // `"__metadata__": null` means no metadata: the reference reads it as an Option.
        struct Opt;
        impl<'de> Visitor<'de> for Opt {
            type Value = Vec<(String, String)>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"__metadata__\" as an object of string values, or null")
            }
            fn visit_none<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(Vec::new())
            }
            fn visit_some<D: de::Deserializer<'de>>(
                self,
                d: D,
            ) -> std::result::Result<Self::Value, D::Error> {
                d.deserialize_map(V)
            }
        }
        d.deserialize_option(Opt)
    }
}

/// Product of the non-zero dimensions must fit u64 (checked whatever the order), then × 0 if any
/// dimension is zero.
pub fn checked_numel(shape: &[u64]) -> Option<u64> {
    let mut p: u64 = 1;
    let mut zero = false;
    for &d in shape {
        if d == 0 {
            zero = true;
        } else {
            p = p.checked_mul(d)?;
        }
    }
    Some(if zero { 0 } else { p })
}

fn validate(path: &Path, parsed: ParsedHeader, data_start: u64, file_len: u64) -> Result<Header> {
    let data_len = file_len - data_start;
    let mut tensors = Vec::with_capacity(parsed.entries.len());
    for (name, e) in parsed.entries {
        let dtype = Dtype::parse(&e.dtype)
            .ok_or_else(|| Error::tensor(path, &name, format!("unknown dtype {:?}", e.dtype)))?;
        let numel = checked_numel(&e.shape).ok_or_else(|| {
            Error::tensor(
                path,
                &name,
                format!("shape {:?} overflows the element count", e.shape),
            )
        })?;
        let bits = numel.checked_mul(dtype.bits()).ok_or_else(|| {
            Error::tensor(
                path,
                &name,
                format!("shape {:?} × {dtype} overflows the byte size", e.shape),
            )
        })?;
        if bits % 8 != 0 {
            return Err(Error::tensor(
                path,
                &name,
                format!("{numel} elements of {dtype} is not a whole number of bytes"),
            ));
        }
        let nbytes = bits / 8;
        let (begin, end) = e.data_offsets;
        if begin > end {
            return Err(Error::tensor(
                path,
                &name,
                format!("data_offsets [{begin}, {end}] are reversed"),
            ));
        }
        if end > data_len {
            return Err(Error::tensor(
                path,
                &name,
                format!(
                    "data_offsets [{begin}, {end}] run past the end of the data section ({data_len} bytes); truncated file?"
                ),
            ));
        }
        if end - begin != nbytes {
            return Err(Error::tensor(
                path,
                &name,
                format!(
                    "shape {:?} × {dtype} needs {nbytes} bytes but data_offsets [{begin}, {end}] span {}",
                    e.shape,
                    end - begin
                ),
            ));
        }
        tensors.push(RawTensor {
            name,
            dtype,
            shape: e.shape,
            numel,
            offset: data_start + begin,
            len: nbytes,
        });
    }
    // Tensors must tile the data section exactly: no overlap, no hole, nothing trailing.
    tensors.sort_by_key(|t| (t.offset, t.len));
    let mut cursor = data_start;
    for t in &tensors {
        if t.offset < cursor {
            return Err(Error::tensor(
                path,
                &t.name,
                format!(
                    "overlaps the previous tensor (starts at data byte {}, previous ends at {})",
                    t.offset - data_start,
                    cursor - data_start
                ),
            ));
        }
        if t.offset > cursor {
            return Err(Error::tensor(
                path,
                &t.name,
                format!(
                    "leaves a hole of {} bytes before it in the data section",
                    t.offset - cursor
                ),
            ));
        }
        cursor = t.offset + t.len;
    }
    if cursor != file_len {
        return Err(Error::header(
            path,
            format!(
                "the tensors cover {} of the {} data bytes; {} bytes are unaccounted for",
                cursor - data_start,
                data_len,
                file_len - cursor
            ),
        ));
    }
    Ok(Header {
        tensors,
        metadata: parsed.metadata,
        data_start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_of(json: &str, data: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data));
        v
    }

    fn check(bytes: &[u8]) -> Result<Header> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        std::fs::write(&p, bytes).unwrap();
        let (f, id) = super::super::file::open_regular(&p).unwrap();
        read_header(&f, &p, id)
    }

    #[test]
    fn accepts_valid() {
        let h = check(&header_of(
            r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"__metadata__":{"format":"pt"}}"#,
            16,
        ))
        .unwrap();
        assert_eq!(h.tensors[0].name, "a");
        assert_eq!(h.metadata, vec![("format".into(), "pt".into())]);
    }

    #[test]
    fn rejects_duplicates_holes_overlaps() {
        let dup = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        let e = check(&header_of(dup, 8)).unwrap_err();
        assert!(
            matches!(&e, Error::Tensor { name, .. } if name == "a"),
            "{e}"
        );
        assert!(e.to_string().contains("duplicate"));
        let hole = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(format!("{}", check(&header_of(hole, 8)).unwrap_err()).contains("hole"));
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(format!("{}", check(&header_of(overlap, 8)).unwrap_err()).contains("overlap"));
    }

    #[test]
    fn tensor_count_limit() {
        let entries = |n: usize| {
            let parts: Vec<String> = (0..n)
                .map(|i| format!(r#""t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#))
                .collect();
            format!("{{{}}}", parts.join(","))
        };
        let ok = check(&header_of(&entries(MAX_TENSORS_PER_FILE), 0)).unwrap();
        assert_eq!(ok.tensors.len(), MAX_TENSORS_PER_FILE);
        let e = check(&header_of(&entries(MAX_TENSORS_PER_FILE + 1), 0)).unwrap_err();
        assert!(e.to_string().contains("more than 200000 tensors"), "{e}");
    }

    #[test]
    fn rejects_overflow_any_order() {
        for shape in ["[4294967296,4294967296,0]", "[0,4294967296,4294967296]"] {
            let j = format!(r#"{{"a":{{"dtype":"F32","shape":{shape},"data_offsets":[0,0]}}}}"#);
            let e = format!("{}", check(&header_of(&j, 0)).unwrap_err());
            assert!(e.contains("overflow"), "{e}");
        }
    }

    // Verdicts the reference `safetensors` (0.8) gives, checked against it by
    // tests/test_properties_io.py.
    #[test]
    fn unknown_fields_are_parsed_like_the_reference() {
        let with = |extra: &str| {
            let j = format!(
                r#"{{"a":{{"dtype":"F32","shape":[1],"data_offsets":[0,4],"z":{extra}}}}}"#
            );
            check(&header_of(&j, 4))
        };
        assert!(with("[1,{\"k\":null},\"s\",1.5,123456789012345678901234567890]").is_ok());
        assert!(with("1e400").is_err(), "a number out of f64 range");
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(with(&deep(100)).is_ok());
        let e = format!("{}", with(&deep(5000)).unwrap_err());
        assert!(e.contains("recursion limit"), "{e}");
        // Positional entries, as serde's derive accepts them.
        let seq = r#"{"a":["F32",[1],[0,4]]}"#;
        assert_eq!(check(&header_of(seq, 4)).unwrap().tensors[0].len, 4);
        let dup = r#"{"a":{"dtype":"F32","shape":[1],"shape":[1],"data_offsets":[0,4]}}"#;
        assert!(format!("{}", check(&header_of(dup, 4)).unwrap_err()).contains("duplicate field"));
        let missing = r#"{"a":{"dtype":"F32","data_offsets":[0,4]}}"#;
        assert!(format!("{}", check(&header_of(missing, 4)).unwrap_err()).contains("missing field"));
    }

    #[test]
    fn null_metadata_is_no_metadata() {
        let h = check(&header_of(r#"{"__metadata__":null}"#, 0)).unwrap();
        assert!(h.metadata.is_empty());
        let twice = r#"{"__metadata__":null,"__metadata__":{}}"#;
        assert!(format!("{}", check(&header_of(twice, 0)).unwrap_err()).contains("duplicate"));
        assert!(check(&header_of(r#"{"__metadata__":{"a":null}}"#, 0)).is_err());
    }

    #[test]
    fn rejects_huge_declared_length_without_allocating() {
        let mut v = u64::MAX.to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        assert!(format!("{}", check(&v).unwrap_err()).contains("limit"));
    }
}
