//! The parsers of untrusted model files never panic: GGUF headers,
//! safetensors headers and shard indexes, mutated from valid files.
//! Property runs: 256 cases each by default (CI); `PROPTEST_CASES=10000000`
//! for the long local runs the README reports.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use proptest::prelude::*;
use r3_model::gguf::GgufFile;
use r3_model::tiny::TinyModel;
use r3_model::{Architecture, Weights};

/// Valid files to mutate, written once: a tiny GGUF and a tiny HF
/// directory's safetensors, and where to write the mutants.
struct Seeds {
    gguf: Vec<u8>,
    safetensors: Vec<u8>,
    dir: tempfile::TempDir,
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
            dir,
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

/// A fresh directory under the seeds' one, for a case's files.
fn case_dir() -> PathBuf {
    let dir = seeds().dir.path().join("case");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
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
        let seed = &seeds().gguf;
        // Metadata and tensor infos: the tokenizer's vocabulary makes the
        // header most of a tiny file, so mutate its first 16 KiB.
        let bytes = mutant(seed, 16 << 10, &edits, keep);
        let path = case_dir().join("m.gguf");
        write(&path, &bytes);
        if let Ok(file) = GgufFile::open(&path) {
            let _ = file.config(256);
        }
    }

    #[test]
    fn safetensors_headers_never_panic(edits in edits(), keep in keep()) {
        let seed = &seeds().safetensors;
        let header = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
        let bytes = mutant(seed, header, &edits, keep);
        let dir = case_dir();
        write(&dir.join("model.safetensors"), &bytes);
        let _ = Weights::from_hf_dir(&dir);
    }

    #[test]
    fn shard_indexes_never_panic(index in "[\\[\\]{}\":,./a-z0-9_-]{0,120}") {
        let dir = case_dir();
        write(&dir.join("model-1.safetensors"), &seeds().safetensors);
        write(&dir.join("model.safetensors.index.json"), index.as_bytes());
        let _ = Weights::from_hf_dir(&dir);
    }

    #[test]
    fn shard_indexes_of_real_shape_never_panic(
        names in proptest::collection::vec("(\\.\\./|/|[a-z0-9_.-]{0,12}/?){0,3}", 1..4)
    ) {
        let dir = case_dir();
        write(&dir.join("model-1.safetensors"), &seeds().safetensors);
        let map: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("t{i}"), serde_json::Value::from(n.as_str())))
            .collect();
        let index = serde_json::json!({"weight_map": map}).to_string();
        write(&dir.join("model.safetensors.index.json"), index.as_bytes());
        let _ = Weights::from_hf_dir(&dir);
    }
}
