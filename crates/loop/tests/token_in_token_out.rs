//! A conversation continued turn by turn in the KV cache decodes to exactly
//! the text the default model's chat template renders for it.

use r3_generate::{FinishReason, SamplingParams};
use r3_loop::{Failure, Policy, Rollouts};
use r3_model::{Llama, Message};
use r3_tasks::Prompts;
use serde_json::json;

#[test]
fn rollout_ids_decode_to_the_rendered_conversation() {
    let loaded = r3_model::load(&r3_fetch::path().unwrap()).unwrap();
    let model = Llama::new(&loaded.config, &loaded.weights).unwrap();
    let policy = Policy::new(&model, &loaded);
    let task = r3_tasks::builtin("countdown").unwrap();
    for system in [None, Some("Answer briefly.".to_string())] {
        let prompts = Prompts {
            system: system.clone(),
            ..Prompts::for_task(task.as_ref())
        };
        let rollouts = Rollouts::new(&policy, task.as_ref(), &prompts, 8);
        let record = json!({"nums": [3, 7, 25], "target": 46});
        let params = SamplingParams {
            temperature: 0.9,
            max_new_tokens: 48,
            seed: 1,
            ..Default::default()
        };
        let attempt = &rollouts
            .attempts(&[&record], 1, &params, 0, &mut |_| {})
            .unwrap()[0][0];
        assert!(
            !attempt.verdict.success,
            "the 135M model does not solve Countdown"
        );
        let failure = Failure {
            record: &record,
            attempt_tokens: attempt.tokens.clone(),
        };
        let groups = rollouts
            .reflect_and_retry(&[failure], 3, &params, &params, 0, &mut |_| {})
            .unwrap();
        assert_eq!(groups[0].len(), 3);
        for rollout in &groups[0] {
            let mut messages = rollouts.first_messages(&record);
            messages.push(Message::new("assistant", attempt.text.as_str()));
            messages.push(Message::new("user", prompts.reflection.as_str()));
            messages.push(Message::new("assistant", rollout.reflection_text.as_str()));
            messages.push(Message::new("user", task.user_prompt(&record)));
            messages.push(Message::new("assistant", rollout.retry.text.as_str()));
            let rendered = loaded.chat_template.render(&messages, false).unwrap();
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
