//! The decoder against HF transformers' float32 numbers for the default model
//! (`reference/smollm2-135m-instruct.json`, kept in the repository so a
//! bare clone can test).

use std::path::PathBuf;

use candle_core::{IndexOp, D};
use r3_model::{KvCache, Llama, LoadedModel, Message};
use serde_json::Value;

fn reference() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../reference/smollm2-135m-instruct.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn default_model() -> (LoadedModel, Llama) {
    let path = r3_fetch::path().expect("default model");
    let loaded = r3_model::load(&path).expect("load default model");
    let model = Llama::new(&loaded.config, &loaded.weights).expect("build decoder");
    (loaded, model)
}

fn messages(case: &Value) -> Vec<Message> {
    serde_json::from_value(case["messages"].clone()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn matches_transformers_on_reference_conversations() {
    let reference = reference();
    let (loaded, model) = default_model();
    assert_eq!(
        loaded.chat_template_source,
        reference["chat_template"].as_str().unwrap()
    );
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let rendered = loaded.chat_template.render(&messages(case), true).unwrap();
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "{name}: rendered text"
        );
        let input_ids = loaded.tokenizer.encode(&rendered).unwrap();
        assert_eq!(input_ids, ids(&case["input_ids"]), "{name}: input_ids");

        let mut cache = KvCache::new(&loaded.config, 1, input_ids.len() + 40);
        let hidden = model.forward(&[&input_ids], &mut cache).unwrap();
        let logits = model.all_logits(&hidden).unwrap().i(0).unwrap();
        let argmax: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        assert_eq!(argmax, ids(&case["argmax_per_position"]), "{name}: argmax");

        let last: Vec<f32> = logits.i(input_ids.len() - 1).unwrap().to_vec1().unwrap();
        let mut worst = 0f32;
        for pair in case["last"]["top50"].as_array().unwrap() {
            let id = pair[0].as_u64().unwrap() as usize;
            let expected = pair[1].as_f64().unwrap() as f32;
            worst = worst.max((last[id] - expected).abs());
        }
        assert!(
            worst <= 1e-3,
            "{name}: top-50 logits differ by up to {worst}"
        );

        // Greedy continuation through the KV cache, one token per step.
        let greedy = &case["greedy"];
        let expected = ids(&greedy["ids"]);
        let mut generated = Vec::new();
        let mut next = argmax[input_ids.len() - 1];
        for _ in 0..greedy["max_new_tokens"].as_u64().unwrap() {
            generated.push(next);
            if loaded.eos_token_ids.contains(&next) {
                break;
            }
            let hidden = model.forward(&[&[next]], &mut cache).unwrap();
            let logits = model.last_logits(&hidden).unwrap();
            next = logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0];
        }
        assert_eq!(generated, expected, "{name}: greedy continuation");
        assert_eq!(
            loaded.tokenizer.decode(&generated).unwrap(),
            greedy["text"].as_str().unwrap(),
            "{name}: decoded text"
        );
    }
}
