//! The parsers of untrusted model files never panic: GGUF headers,
//! safetensors headers and shard indexes, mutated from valid files.
//! Property runs: 256 cases each by default (CI); `PROPTEST_CASES=10000000`
//! for the long local runs docs/testing.md reports.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use proptest::prelude::*;
use r3_model::formats::gguf::GgufFile;
use r3_model::formats::safetensors::{parse_safetensors, shard_names};
use r3_model::tiny::TinyModel;
use r3_model::Architecture;

/// Valid files to mutate: a tiny GGUF and a tiny HF directory's
/// safetensors, written once.
struct Seeds {
    gguf: Vec<u8>,
    safetensors: Vec<u8>,
}

fn seeds() -> &'static Seeds {
    static SEEDS: OnceLock<Seeds> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let tiny = TinyModel::new(Architecture::Qwen2, 64, 1, 1).unwrap();
        tiny.write_gguf(&dir.path().join("seed.gguf"), GgmlDType::Q8_0)
            .unwrap();
        tiny.write_hf_dir(&dir.path().join("seed"), DType::F32)
            .unwrap();
        Seeds {
            gguf: std::fs::read(dir.path().join("seed.gguf")).unwrap(),
            safetensors: std::fs::read(dir.path().join("seed/model.safetensors")).unwrap(),
        }
    })
}

/// `seed` with bytes overwritten at `edits` (positions taken modulo
/// `region`, the header's length) and cut to `keep` of its length.
fn mutant(seed: &[u8], region: usize, edits: &[(usize, u8)], keep: f64) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for &(at, byte) in edits {
        bytes[at % region.min(seed.len())] = byte;
    }
    bytes.truncate((bytes.len() as f64 * keep) as usize);
    bytes
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8)>> {
    proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)
}

fn keep() -> impl Strategy<Value = f64> {
    prop_oneof![3 => Just(1.0), 1 => 0.0..1.0f64]
}

proptest! {
    #[test]
    fn gguf_headers_never_panic(edits in edits(), keep in keep()) {
        // Metadata and tensor infos: the tokenizer's vocabulary makes the
        // header most of a tiny file, so mutate its first 16 KiB.
        let bytes = mutant(&seeds().gguf, 16 << 10, &edits, keep);
        let name = Path::new("m.gguf");
        if let Ok(file) = GgufFile::read(name, &mut std::io::Cursor::new(bytes)) {
            let _ = file.config(256);
        }
    }

    /// Headers built from parts: any number of `general.alignment` keys
    /// with any values, and arrays nested to any depth. Never a panic or a
    /// stack overflow; a repeated or zero alignment and nesting past the
    /// bound are refused by name.
    #[test]
    fn gguf_alignments_and_nesting_never_panic(
        alignments in proptest::collection::vec(any::<u32>(), 0..4),
        depth in prop_oneof![0..20usize, 0..200_000usize],
    ) {
        let mut bytes = Vec::new();
        let string = |bytes: &mut Vec<u8>, s: &str| {
            bytes.extend((s.len() as u64).to_le_bytes());
            bytes.extend(s.as_bytes());
        };
        bytes.extend(0x4655_4747u32.to_le_bytes());
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        bytes.extend((alignments.len() as u64 + 1).to_le_bytes());
        for a in &alignments {
            string(&mut bytes, "general.alignment");
            bytes.extend(4u32.to_le_bytes());
            bytes.extend(a.to_le_bytes());
        }
        string(&mut bytes, "nested");
        bytes.extend(9u32.to_le_bytes());
        for _ in 0..depth {
            bytes.extend(9u32.to_le_bytes());
            bytes.extend(1u64.to_le_bytes());
        }
        bytes.extend(4u32.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        let read = GgufFile::read(Path::new("m.gguf"), &mut std::io::Cursor::new(bytes));
        let e = read.err().map(|e| e.to_string()).unwrap_or_default();
        if alignments.len() > 1 {
            prop_assert!(e.contains("more than once"), "{}", e);
        } else if alignments.first() == Some(&0) {
            prop_assert!(e.contains("alignment is 0"), "{}", e);
        } else if depth > 16 {
            prop_assert!(e.contains("nested more than 16"), "{}", e);
        }
    }

    #[test]
    fn safetensors_headers_never_panic(edits in edits(), keep in keep()) {
        let seed = &seeds().safetensors;
        let header = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
        let bytes = mutant(seed, header, &edits, keep);
        let _ = parse_safetensors(Path::new("model.safetensors"), &bytes);
    }

    #[test]
    fn shard_indexes_never_panic(index in "[\\[\\]{}\":,./a-z0-9_-]{0,120}") {
        let _ = shard_names(Path::new("model.safetensors.index.json"), &index);
    }

    #[test]
    fn shard_indexes_of_real_shape_never_panic(
        names in proptest::collection::vec("(\\.\\./|/|[a-z0-9_.-]{0,12}/?){0,3}", 1..4)
    ) {
        let map: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("t{i}"), serde_json::Value::from(n.as_str())))
            .collect();
        let index = serde_json::json!({"weight_map": map}).to_string();
        if let Ok(shards) = shard_names(Path::new("model.safetensors.index.json"), &index) {
            for shard in shards {
                let path = Path::new(&shard);
                prop_assert!(path.components().count() == 1 && !path.is_absolute() && shard != "..");
            }
        }
    }
}
