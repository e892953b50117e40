//! A conversation continued turn by turn in the KV cache decodes to exactly
//! the text the default model's chat template renders for it, tools
//! included: in the template's own format where it has one, else as JSON in
//! the system turn.

use r3_generate::{FinishReason, SamplingParams};
use r3_loop::{Failure, Policy, Rollouts};
use r3_model::{ChatTemplate, Llama, LoadedModel, Message};
use r3_tasks::Prompts;
use serde_json::{json, Value};

#[test]
fn rollout_ids_decode_to_the_rendered_conversation() {
    let loaded = load_default();
    let record = json!({"nums": [3, 7, 25], "target": 46});
    check_rollouts(&loaded, "countdown", &record);
}

/// A BFCL record's tools reach the prompt: as JSON in the system turn for
/// SmolLM2's template, which has no place for tools, and through `tools`
/// for a template that has one (a Qwen2.5-style one here).
#[test]
fn tools_reach_the_prompt_in_the_templates_format() {
    let record: Value = serde_json::from_str(
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../data/bfcl/simple_python.jsonl"
        ))
        .unwrap()
        .lines()
        .next()
        .unwrap(),
    )
    .unwrap();
    let mut loaded = load_default();
    assert!(!loaded.chat_template.accepts_tools());
    let first = first_prompt(&loaded, &record);
    assert!(
        first.contains("<|im_start|>system\nYou have access to the following tools:"),
        "{first}"
    );
    assert!(
        first.contains("\"name\": \"calculate_triangle_area\"")
            && first.contains("\"type\": \"object\""),
        "{first}"
    );
    check_rollouts(&loaded, "bfcl", &record);

    let with_tools = "{% if tools %}<|im_start|>system\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    loaded.chat_template =
        ChatTemplate::new(with_tools, "", "<|im_end|>", "qwen-like".as_ref()).unwrap();
    assert!(loaded.chat_template.accepts_tools());
    let first = first_prompt(&loaded, &record);
    // As transformers renders it: the record's key order, Python's
    // separators, no HTML escapes.
    assert!(
        first.starts_with("<|im_start|>system\n<tools>{\"type\": \"function\", \"function\": {\"name\": \"calculate_triangle_area\", \"description\": "),
        "{first}"
    );
    assert!(
        first.contains("(defaults to 'units' if not specified)"),
        "{first}"
    );
    assert!(!first.contains("You have access"), "{first}");
    check_rollouts(&loaded, "bfcl", &record);
}

/// The default model (or the model at `R3_TEST_MODEL`: the GPU check
/// brings a small random one with the default model's tokenizer and chat
/// template, since the default GGUF is too large to carry), on
/// `R3_TEST_DEVICE` (the CPU unless set).
fn load_default() -> LoadedModel {
    let path = match std::env::var_os("R3_TEST_MODEL") {
        Some(path) => path.into(),
        None => r3_fetch::path().unwrap(),
    };
    let mut loaded = r3_model::load(&path).unwrap();
    loaded.weights.set_device(r3_model::tiny::test_device());
    loaded
}

fn first_prompt(loaded: &LoadedModel, record: &Value) -> String {
    let model = Llama::new(&loaded.config, &loaded.weights).unwrap();
    let policy = Policy::new(&model, loaded);
    let task = r3_tasks::builtin("bfcl").unwrap();
    let prompts = Prompts::for_task(task.as_ref());
    let rollouts = Rollouts::new(&policy, task.as_ref(), &prompts, 8);
    let tools = rollouts.tools(record);
    let ids = policy
        .chat
        .prompt(&rollouts.first_messages(record), tools.as_ref())
        .unwrap();
    loaded.tokenizer.decode(&ids).unwrap()
}

/// Samples a failed attempt at `record`, three reflections and retries, and
/// checks each rollout's ids against the template's rendering.
fn check_rollouts(loaded: &LoadedModel, task: &str, record: &Value) {
    let model = Llama::new(&loaded.config, &loaded.weights).unwrap();
    let policy = Policy::new(&model, loaded);
    let task = r3_tasks::builtin(task).unwrap();
    for system in [None, Some("Answer briefly.".to_string())] {
        let prompts = Prompts {
            system: system.clone(),
            ..Prompts::for_task(task.as_ref())
        };
        let rollouts = Rollouts::new(&policy, task.as_ref(), &prompts, 8);
        let params = SamplingParams {
            temperature: 0.9,
            max_new_tokens: 48,
            seed: 1,
            ..Default::default()
        };
        let attempt = &rollouts
            .attempts(&[record], 1, &params, 0, &mut |_| {})
            .unwrap()[0][0];
        assert!(
            !attempt.verdict.success,
            "neither the 135M model nor a random one solves Countdown or BFCL"
        );
        let failure = Failure {
            record,
            attempt_tokens: attempt.tokens.clone(),
        };
        let groups = rollouts
            .reflect_and_retry(&[failure], 3, &params, &params, 0, &mut |_| {})
            .unwrap();
        assert_eq!(groups[0].len(), 3);
        for rollout in &groups[0] {
            let mut messages = rollouts.first_messages(record);
            messages.push(Message::new("assistant", attempt.text.as_str()));
            messages.push(Message::new("user", prompts.reflection.as_str()));
            messages.push(Message::new("assistant", rollout.reflection_text.as_str()));
            messages.push(Message::new("user", task.user_prompt(record)));
            messages.push(Message::new("assistant", rollout.retry.text.as_str()));
            let tools = rollouts.tools(record);
            let rendered = loaded
                .chat_template
                .render_with_tools(&messages, tools.as_ref(), false)
                .unwrap();
            let decoded = loaded.tokenizer.decode(&rollout.ids).unwrap();
            if rollout.retry.finish == FinishReason::Eos {
                assert_eq!(format!("{decoded}\n"), rendered);
            } else {
                assert!(
                    rendered.starts_with(&decoded),
                    "decoded:\n{decoded}\nrendered:\n{rendered}"
                );
            }
            // The reflection span holds exactly the reflection's sampled ids.
            let span = &rollout.ids[rollout.reflection.clone()];
            let text = loaded.tokenizer.decode(span).unwrap();
            assert!(text.starts_with(&rollout.reflection_text));
            if rollout.reflection_finish == FinishReason::Eos {
                assert_eq!(
                    span.last(),
                    Some(&loaded.eos_token_ids[0]),
                    "the end-of-turn token is part of the reflection"
                );
            }
        }
    }
}
