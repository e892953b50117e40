//! The three reference conversations greedily decoded in one padded batch
//! give exactly transformers' continuations.

use std::path::PathBuf;

use r3_generate::{FinishReason, Generator, SamplingParams};
use r3_model::{Llama, Message};

#[test]
fn batched_greedy_matches_transformers() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../reference/smollm2-135m-instruct.json");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let loaded = r3_model::load(&r3_fetch::path().unwrap()).unwrap();
    let model = Llama::new(&loaded.config, &loaded.weights).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| {
            let messages: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
            let text = loaded.chat_template.render(&messages, true).unwrap();
            loaded.tokenizer.encode(&text).unwrap()
        })
        .collect();
    let g = Generator::new(&model, &loaded.tokenizer, &loaded.eos_token_ids);
    let params = SamplingParams {
        max_new_tokens: 32,
        ..Default::default()
    };
    let out = g.generate(&prompts, &params).unwrap();
    for (case, completion) in cases.iter().zip(&out) {
        let expected: Vec<u32> = serde_json::from_value(case["greedy"]["ids"].clone()).unwrap();
        assert_eq!(completion.tokens, expected, "{}", case["name"]);
        let hit_eos = case["greedy"]["hit_eos"].as_bool().unwrap();
        assert_eq!(completion.finish == FinishReason::Eos, hit_eos);
    }
}
