//! The device test: `r3 device-check` against the first GPU on a tiny random
//! model with the default model's tokenizer (logits, greedy tokens, sampled
//! rollouts, one training step and bf16, each against the CPU). Ignored by
//! default, since CI has no GPU; on a GPU machine run it with
//! `cargo test --features r3-cli/cuda --test gpu -- --ignored` (or the test
//! binary `scripts/build-cuda.sh tests` builds), where it fails unless a
//! GPU opens and agrees with the CPU.

mod common;

#[test]
#[ignore = "needs a CUDA build and a GPU: cargo test --features r3-cli/cuda --test gpu -- --ignored"]
fn a_gpu_agrees_with_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let (ok, _, err) = common::init_tiny(&model, &[]);
    assert!(ok, "{err}");
    let (ok, stdout, err) = common::device_check(&model, "cuda", &[]);
    assert!(ok, "no GPU agreed with the CPU here:\n{stdout}\n{err}");
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
