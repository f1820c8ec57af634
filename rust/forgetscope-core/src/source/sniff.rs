//! Recognise files that are not safetensors, so the error says what the user actually has.

/// Describe what `head` (the first bytes of a file) looks like, if it is a known foreign format.
pub fn foreign_format(head: &[u8], file_len: u64) -> Option<String> {
    let trimmed = trim_ascii_start(head);
    let lower: Vec<u8> = trimmed
        .iter()
        .take(32)
        .map(|b| b.to_ascii_lowercase())
        .collect();
    if file_len == 0 {
        return Some("the file is empty (0 bytes)".into());
    }
    if head.starts_with(b"version https://git-lfs") {
        return Some(
            "a Git LFS pointer, not the weights; fetch the real file (`git lfs pull`)".into(),
        );
    }
    if lower.starts_with(b"<!doctype html")
        || lower.starts_with(b"<html")
        || lower.starts_with(b"<?xml")
    {
        return Some("an HTML/XML page (a failed or redirected download?)".into());
    }
    if head.starts_with(b"GGUF") {
        return Some("a GGUF file (llama.cpp format); convert it to safetensors first".into());
    }
    if head.starts_with(b"PK\x03\x04") {
        return Some(
            "a zip archive (the PyTorch torch.save format of .bin/.pt files); convert it to safetensors"
                .into(),
        );
    }
    if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return Some(
            "a Python pickle (legacy PyTorch .bin/.pt); it is never unpickled here, convert it to safetensors"
                .into(),
        );
    }
    if head.starts_with(b"\x93NUMPY") {
        return Some("a NumPy .npy array".into());
    }
    if trimmed.first() == Some(&b'{') {
        return Some(
            "a JSON document (pass the checkpoint directory or the *.safetensors.index.json path)"
                .into(),
        );
    }
    None
}

/// Skip whitespace and a UTF-8 byte-order mark (common in saved HTML pages), in either order.
fn trim_ascii_start(b: &[u8]) -> &[u8] {
    let ws = |b: &[u8]| -> usize { b.iter().take_while(|c| c.is_ascii_whitespace()).count() };
    let b = &b[ws(b)..];
    let b = b.strip_prefix(b"\xef\xbb\xbf").unwrap_or(b);
    &b[ws(b)..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_formats() {
        assert!(foreign_format(b"\x80\x02}q\x00", 100)
            .unwrap()
            .contains("pickle"));
        assert!(foreign_format(b"PK\x03\x04rest", 100)
            .unwrap()
            .contains("zip"));
        assert!(
            foreign_format(b"version https://git-lfs.github.com/spec/v1\n", 100)
                .unwrap()
                .contains("LFS")
        );
        assert!(foreign_format(b"  <!DOCTYPE html><html>", 100)
            .unwrap()
            .contains("HTML"));
        assert!(foreign_format(b"GGUF\x03\x00", 100)
            .unwrap()
            .contains("GGUF"));
        assert!(foreign_format(b"", 0).unwrap().contains("empty"));
        assert!(foreign_format(b"\x10\x00\x00\x00\x00\x00\x00\x00{", 100).is_none());
    }
}
