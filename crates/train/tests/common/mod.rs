//! A toy world on a tiny model where a retry succeeds only through what the
//! reflection says. The model is first taught the world by supervised
//! training: after the failed attempt it reflects with one of the letters
//! A–D, uniformly, and its retry answers the digit that letter stands for
//! (A→1, B→2, C→3, D→4). The task wants "3": only the reflection "C"
//! carries that information.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use candle_core::{DType, Tensor};
use r3_loop::mine::MinedFailure;
use r3_loop::{ChatEncoder, Failure, Policy, Rollouts};
use r3_model::tiny::TinyModel;
use r3_model::{Architecture, Llama, LoadedModel, Message};
use r3_tasks::{Prompts, Task, Verdict};
use r3_train::optim::AdamW;
use r3_train::score::span_logprobs;
use r3_train::spans::TrainedSpan;
use serde_json::{json, Value};

/// Spans scoring `tokens[i]` after `contexts[i]` (advantage and weight do
/// not enter the scorer).
pub fn spans<'a>(contexts: &[&'a [u32]], tokens: &[&'a [u32]]) -> Vec<TrainedSpan<'a>> {
    contexts
        .iter()
        .zip(tokens)
        .map(|(&context, &tokens)| TrainedSpan {
            context,
            tokens,
            advantage: 0.0,
            weight: 0.0,
            sampled: None,
        })
        .collect()
}

pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];
pub const DIGITS: [&str; 4] = ["1", "2", "3", "4"];
/// The reflection that makes the retry right.
pub const GOOD: usize = 2;

/// Correct exactly when the reply is `target`.
pub struct ToyTask {
    pub target: String,
}

impl Task for ToyTask {
    fn name(&self) -> &'static str {
        "toy"
    }
    fn check_record(&self, _: &Value) -> Result<(), String> {
        Ok(())
    }
    fn user_prompt(&self, _: &Value) -> String {
        "?".into()
    }
    fn verify(&self, _: &Value, answer: &str) -> Verdict {
        if answer == self.target {
            Verdict::pass()
        } else {
            Verdict::fail(format!("said {answer:?}"))
        }
    }
}

pub fn prompts() -> Prompts {
    Prompts {
        system: None,
        reflection: "why".into(),
        retry: None,
    }
}

pub struct Toy {
    pub dir: tempfile::TempDir,
    pub loaded: LoadedModel,
    pub task: ToyTask,
    pub letters: Vec<u32>,
    pub failures: Vec<MinedFailure>,
}

/// Ids of the conversation up to the reflection, and from the reflection
/// letter to the retry answer.
struct ToyConversation {
    prefix: Vec<u32>,
    /// For each letter: the ids after the prefix up to the retry's answer.
    before_answer: Vec<Vec<u32>>,
}

fn toy_conversation(loaded: &LoadedModel, attempt: &[u32], letters: &[u32]) -> ToyConversation {
    let chat = ChatEncoder::new(&loaded.chat_template, &loaded.tokenizer, &loaded.eos_token);
    let history = vec![Message::new("user", "?")];
    let mut prefix = chat.prompt(&history, None).unwrap();
    prefix.extend(attempt);
    prefix.extend(chat.next_turn(&history, None, "why", true).unwrap());
    let mut after = history.clone();
    after.push(Message::new("assistant", "no"));
    after.push(Message::new("user", "why"));
    // One-token reflections end by length: the turn's closing text follows.
    let continuation = chat.next_turn(&after, None, "?", false).unwrap();
    let before_answer = letters
        .iter()
        .map(|&l| [vec![l], continuation.clone()].concat())
        .collect();
    ToyConversation {
        prefix,
        before_answer,
    }
}

/// Teaches a tiny random model the toy world with plain supervised steps.
fn teach(
    tiny: &mut TinyModel,
    _loaded: &LoadedModel,
    layout: &ToyConversation,
    letters: &[u32],
    digits: &[u32],
) {
    let (model, vars) = tiny.trainable().unwrap();
    let mut adam = AdamW::new(vars, 0.9, 0.999, 1e-8, 0.0).unwrap();
    for _ in 0..200 {
        // Every letter equally likely as the reflection…
        let reflections: Vec<&[u32]> = letters.iter().map(std::slice::from_ref).collect();
        let prefixes = vec![layout.prefix.as_slice(); 4];
        let lp_reflection =
            span_logprobs(&model, &spans(&prefixes, &reflections), 1.0, true).unwrap();
        // …and the retry answering that letter's digit.
        let retry_prefixes: Vec<Vec<u32>> = layout
            .before_answer
            .iter()
            .map(|b| [layout.prefix.clone(), b.clone()].concat())
            .collect();
        let retry_refs: Vec<&[u32]> = retry_prefixes.iter().map(Vec::as_slice).collect();
        let answers: Vec<&[u32]> = digits.iter().map(std::slice::from_ref).collect();
        let lp_retry = span_logprobs(&model, &spans(&retry_refs, &answers), 1.0, true).unwrap();
        let loss = ((lp_reflection.mean_all().unwrap() + lp_retry.mean_all().unwrap()).unwrap()
            * -1.0)
            .unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<Tensor> = adam
            .params
            .iter()
            .map(|(_, v)| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap())
            })
            .collect();
        adam.update(&g, 3e-3, 1.0).unwrap();
    }
    tiny.weights = model.hf_weights().unwrap();
}

pub fn toy() -> Toy {
    let dir = tempfile::tempdir().unwrap();
    let mut tiny = TinyModel::new(Architecture::Llama, 64, 2, 7).unwrap();
    tiny.write_hf_dir(dir.path(), DType::F32).unwrap();
    let loaded = r3_model::load(dir.path()).unwrap();
    let id = |s: &str| loaded.tokenizer.encode(s).unwrap()[0];
    let letters: Vec<u32> = LETTERS.iter().map(|s| id(s)).collect();
    let digits: Vec<u32> = DIGITS.iter().map(|s| id(s)).collect();
    let attempt: Vec<u32> = [
        loaded.tokenizer.encode("no").unwrap(),
        vec![loaded.eos_token_ids[0]],
    ]
    .concat();
    let layout = toy_conversation(&loaded, &attempt, &letters);
    teach(&mut tiny, &loaded, &layout, &letters, &digits);
    tiny.write_hf_dir(dir.path(), DType::F32).unwrap();
    let loaded = r3_model::load(dir.path()).unwrap();
    let failures = (0..4)
        .map(|index| MinedFailure {
            index,
            record: json!({"prompt": "?"}),
            attempt: "no".into(),
            attempt_tokens: attempt.clone(),
            reason: "wrong".into(),
            samples: 1,
            failures: 1,
            failure_rate: 1.0,
        })
        .collect();
    Toy {
        dir,
        loaded,
        task: ToyTask {
            target: DIGITS[GOOD].into(),
        },
        letters,
        failures,
    }
}

/// Retry success of `samples` reflections drawn as training draws them.
pub fn retry_success(toy: &Toy, model: &Llama, samples: usize) -> f64 {
    let policy = Policy::new(model, &toy.loaded);
    let prompts = prompts();
    let rollouts = Rollouts::new(&policy, &toy.task, &prompts, 64);
    let record = json!({"prompt": "?"});
    let failure = Failure {
        record: &record,
        attempt_tokens: toy.failures[0].attempt_tokens.clone(),
    };
    let reflect = r3_generate::SamplingParams {
        temperature: 1.0,
        top_k: 4,
        max_new_tokens: 1,
        seed: 999,
        ..Default::default()
    };
    let retry = r3_generate::SamplingParams {
        max_new_tokens: 1,
        ..Default::default()
    };
    let groups = rollouts
        .reflect_and_retry(&[failure], samples, &reflect, &retry, 0, &mut |_| {})
        .unwrap();
    groups[0].iter().map(|r| r.reward() as f64).sum::<f64>() / samples as f64
}

/// Probability of reflecting "C", the letter that carries the answer.
pub fn good_reflection_probability(toy: &Toy, model: &Llama) -> f64 {
    let layout = toy_conversation(&toy.loaded, &toy.failures[0].attempt_tokens, &toy.letters);
    let good = [toy.letters[GOOD]];
    let lp = span_logprobs(
        model,
        &spans(&[layout.prefix.as_slice()], &[&good]),
        1.0,
        false,
    )
    .unwrap();
    (lp.to_vec1::<f32>().unwrap()[0] as f64).exp()
}
