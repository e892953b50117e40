//! What the binary's tests share: running `r3`, and a tiny model with data.
// Each test file uses a part of this.
#![allow(dead_code)]

use std::process::Command;

/// `r3 bench kernels` at its shortest: every encoding for a moment, a
/// small streamed copy, a short probe of the read rate.
pub const QUICK_BENCH_KERNELS: [&str; 8] = [
    "bench",
    "kernels",
    "--seconds",
    "0.01",
    "--streamed-mib",
    "8",
    "--limit-seconds",
    "0.05",
];

/// Runs `r3 ARGS`: (success, stdout, stderr).
pub fn r3(args: &[&str]) -> (bool, String, String) {
    r3_in(std::path::Path::new("."), args)
}

/// Runs `r3 ARGS` in the working directory `dir`: (success, stdout, stderr).
pub fn r3_in(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    r3_with(dir, &[], args)
}

/// Runs `r3 ARGS` in `dir` with the environment variables `env` set.
pub fn r3_with(
    dir: &std::path::Path,
    env: &[(&str, &std::ffi::OsStr)],
    args: &[&str],
) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_r3"))
        .current_dir(dir)
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `r3 init --out OUT EXTRA…` on the shipped shape gpu-check.sh writes its
/// tiny model from (configs/tiny-smollm2-vocab.json), with the default
/// model's tokenizer: (success, stdout, stderr).
pub fn init_tiny(out: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
    let shape = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs/tiny-smollm2-vocab.json");
    let mut args = vec![
        "init",
        "--shape",
        shape.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    r3(&args)
}

/// `r3 device-check --model MODEL --device DEVICE EXTRA…`: (success,
/// stdout, stderr).
pub fn device_check(
    model: &std::path::Path,
    device: &str,
    extra: &[&str],
) -> (bool, String, String) {
    let mut args = vec![
        "device-check",
        "--model",
        model.to_str().unwrap(),
        "--device",
        device,
    ];
    args.extend_from_slice(extra);
    r3(&args)
}

/// A tiny random HF model (it fails nearly everything) and `n` arithmetic
/// records, in `dir`. Its embeddings are scaled down so that sampling
/// varies (at full scale one token dominates every step).
pub fn tiny_model_and_data(dir: &std::path::Path, n: usize, seed: &str) -> (String, String) {
    let model = dir.join("tiny");
    let mut tiny = r3_model::tiny::TinyModel::new(r3_model::Architecture::Llama, 64, 1, 3).unwrap();
    let embeddings = tiny.weights.get_mut("model.embed_tokens.weight").unwrap();
    *embeddings = (embeddings.clone() * 0.1).unwrap();
    tiny.write_hf_dir(&model, candle_core::DType::F32).unwrap();
    let data = dir.join(format!("data-{seed}.jsonl"));
    let count = n.to_string();
    let (ok, _, err) = r3(&[
        "data",
        "arithmetic",
        "--count",
        &count,
        "--seed",
        seed,
        "--out",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    (
        model.to_str().unwrap().to_string(),
        data.to_str().unwrap().to_string(),
    )
}

/// A tiny model and `n` arithmetic records (see [`tiny_model_and_data`]),
/// a verifier passing an answer when the sum of its bytes is a multiple of
/// `modulus` (deterministic mixed rewards, so that groups train), and
/// failures mined with 2 samples per record. Returns (model, verifier
/// command, failures file).
pub fn mined_tiny_run(
    dir: &std::path::Path,
    n: usize,
    seed: &str,
    modulus: u32,
    max_new_tokens: &str,
) -> (String, String, String) {
    let (model, data) = tiny_model_and_data(dir, n, seed);
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    std::fs::write(
        path("verify.py"),
        format!(
            "import json, sys\nfor line in sys.stdin:\n    m = json.loads(line)\n    \
             print(json.dumps({{\"id\": m[\"id\"], \"success\": sum(m[\"answer\"].encode()) % {modulus} == 0}}), flush=True)\n"
        ),
    )
    .unwrap();
    let verifier = format!("python3 {}", path("verify.py"));
    let failures = path("failures.jsonl");
    let (ok, _, err) = r3(&[
        "mine",
        "--model",
        &model,
        "--verifier",
        &verifier,
        "--data",
        &data,
        "--samples",
        "2",
        "--max-new-tokens",
        max_new_tokens,
        "--out",
        &failures,
    ]);
    assert!(ok, "{err}");
    (model, verifier, failures)
}
