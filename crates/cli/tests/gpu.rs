//! The device test: `r3 device-check` against the first GPU on a tiny random
//! model with the default model's tokenizer (logits, greedy tokens, sampled
//! rollouts, one training step and bf16, each against the CPU). It runs on
//! a CUDA build where a GPU opens (`cargo test --features r3-cli/cuda` on a
//! GPU machine, or the test binary `scripts/build-cuda.sh tests` builds),
//! and otherwise says why it was skipped: every other test runs on the CPU.

mod common;

#[test]
fn a_gpu_agrees_with_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let (ok, _, err) = common::init_tiny(&model, &[]);
    assert!(ok, "{err}");
    let (ok, stdout, err) = common::device_check(&model, "cuda", &[]);
    if !ok && err.contains("built without CUDA") {
        eprintln!("skipped: this r3 was built without CUDA (see scripts/build-cuda.sh)");
        return;
    }
    if !ok && err.contains("cannot open cuda:0") {
        let why = err.lines().find(|l| l.contains("cannot open"));
        let why = why.unwrap_or_default().trim();
        eprintln!("skipped: no GPU opens here ({why})");
        return;
    }
    assert!(ok, "{stdout}\n{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for key in [
        "logits_ok",
        "greedy_equal",
        "rollout_equal",
        "update_ok",
        "bf16_ok",
    ] {
        assert_eq!(v[key], true, "{key}: {v}");
    }
    assert!(v["device"].as_str().unwrap().starts_with("cuda"), "{v}");
}
