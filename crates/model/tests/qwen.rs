//! A real Qwen2 model stored as Q4_K_M: its K-quant projections stay packed
//! (Q4_K and Q6_K re-cut to K4 and K6, Q5_0 and Q8_0 as stored), and the packed decoder gives the logits of the decoder
//! with every weight expanded to f32. Ignored by default (the file is 491
//! MB, and CI does not fetch it); run it with `R3_QWEN_GGUF=$(r3 fetch
//! qwen2.5-coder-0.5b) cargo test -p r3-model --test qwen -- --ignored`.

use candle_core::IndexOp;
use r3_model::tiny::max_abs;
use r3_model::{KvCache, Llama};

#[test]
#[ignore = "needs R3_QWEN_GGUF, a real Qwen2.5-Coder-0.5B Q4_K_M GGUF (r3 fetch qwen2.5-coder-0.5b)"]
fn packed_k_quants_give_the_f32_models_logits() {
    let path = std::env::var("R3_QWEN_GGUF")
        .expect("R3_QWEN_GGUF must name the GGUF file when this test is asked for");
    let loaded = r3_model::load(path.as_ref()).unwrap();
    let packed = Llama::new(&loaded.config, &loaded.weights).unwrap();
    assert!(
        packed.packed_weights() > 400_000_000,
        "{}",
        packed.packed_weights()
    );
    let (dense, _) = Llama::trainable(&loaded.config, &loaded.weights).unwrap();
    let dense = dense.for_generation().unwrap();
    let ids = loaded
        .tokenizer
        .encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.")
        .unwrap();
    let logits = |model: &Llama| {
        let mut cache = KvCache::new(&loaded.config, 1, ids.len());
        let hidden = model.forward(&[&ids], &mut cache).unwrap();
        model.last_logits(&hidden).unwrap().i(0).unwrap()
    };
    let (a, b) = (logits(&packed), logits(&dense));
    let diff = max_abs(&(&a - &b).unwrap()).unwrap();
    let scale = max_abs(&b).unwrap();
    eprintln!("largest logit difference {diff} (largest logit {scale})");
    assert!(diff <= 1e-3 * scale.max(1.0), "{diff}");
    assert_eq!(
        a.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
        b.argmax(0).unwrap().to_scalar::<u32>().unwrap()
    );
}
