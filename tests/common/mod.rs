//! Helpers shared by the integration tests.
#![allow(dead_code)]

/// A byte-level BPE tokenizer.json over the printable ASCII bytes (ids 0..95, well inside tiny's vocab of 320).
pub fn ascii_tokenizer_json() -> String {
    // GPT-2 byte-level alphabet: printable ASCII maps to itself, ' ' to 'Ġ'.
    let vocab: Vec<String> = (b' '..=b'~')
        .enumerate()
        .map(|(i, b)| {
            let ch = if b == b' ' { "\u{120}".to_string() } else { (b as char).to_string() };
            format!("{}: {i}", serde_json::to_string(&ch).unwrap())
        })
        .collect();
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}},
        "post_processor": null,
        "decoder": {{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}},
        "model": {{"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": {{{}}}, "merges": []}}}}"#,
        vocab.join(", ")
    )
}
