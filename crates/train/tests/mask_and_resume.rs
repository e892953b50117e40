//! The reflection mask: the production spans are the reflection, nothing
//! after it reaches the trained log-probs, and the efficient scoring path
//! agrees with a full forward masked to the reflection, and a resumed run
//! continues exactly like an uninterrupted one.

mod common;

use candle_core::{IndexOp, Tensor, Var, D};
use r3_model::lora::Adapter;
use r3_model::tiny::{max_abs, TinyModel};
use r3_model::{Architecture, KvCache, Llama};
use r3_train::config::{TrainConfig, TrainOn};
use r3_train::grpo::Group;
use r3_train::grpo::{grpo_loss, LossType, Objective, TokenTerms};
use r3_train::score::span_logprobs;
use r3_train::spans::trained_spans;
use r3_train::trainer::{StartWeights, Trainer};

fn trainable() -> (Llama, Vec<(String, Var)>) {
    TinyModel::new(Architecture::Llama, 64, 2, 21)
        .unwrap()
        .trainable()
        .unwrap()
}

/// A rollout of `ids` whose reflection is `reflection` and whose retry is
/// everything from position 24 on.
fn rollout_of(ids: &[u32], reflection: std::ops::Range<usize>) -> r3_loop::Rollout {
    r3_loop::Rollout {
        ids: ids.to_vec(),
        reflection,
        reflection_text: String::new(),
        reflection_finish: r3_generate::FinishReason::Eos,
        retry: r3_loop::Attempt {
            tokens: ids[24..].to_vec(),
            text: String::new(),
            finish: r3_generate::FinishReason::Eos,
            verdict: r3_tasks::Verdict::pass(),
        },
        sampled_logprobs: Default::default(),
    }
}

#[test]
fn only_the_reflection_is_trained() {
    let (model, vars) = trainable();
    // prompt 0..8 | attempt 8..12 | request 12..15 | reflection 15..20 | retry request 20..24 | retry 24..28
    let ids: Vec<u32> = (0..28).map(|i| (i * 37 + 11) % 260).collect();
    let reflection = 15..20;
    let mut cache = KvCache::differentiable(&model.config, 1);
    let hidden = model.forward(&[&ids], &mut cache).unwrap();
    let logits = model.all_logits(&hidden).unwrap().i(0).unwrap(); // [28, vocab]
                                                                   // The production mask: the span the trainer trains for this rollout.
    let rollout = rollout_of(&ids, reflection.clone());
    let groups = [Group::new(vec![rollout], true)];
    let spans = trained_spans(&groups, TrainOn::Reflection, LossType::Grpo, 64);
    let span = spans[0][0];
    let trained = span.context.len()..span.context.len() + span.tokens.len();
    assert_eq!(trained, reflection, "the span is the reflection");
    // Position p predicts id p + 1: 1 where that id is trained, 0 elsewhere.
    let mask: Vec<f32> = (0..ids.len())
        .map(|p| if trained.contains(&(p + 1)) { 1.0 } else { 0.0 })
        .collect();
    let objective = Objective {
        epsilon_low: 0.2,
        epsilon_high: 0.2,
        beta: 0.04,
    };
    // The masked GRPO loss over every position of the conversation.
    let masked_loss = |logits: &Tensor| -> (Tensor, Tensor) {
        let logp_all = candle_nn::ops::log_softmax(logits, D::Minus1).unwrap();
        let targets = Tensor::new(&ids[1..], logits.device())
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let logprobs = logp_all
            .narrow(0, 0, 27)
            .unwrap()
            .gather(&targets, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let weights: Vec<f32> = mask[..27].iter().map(|m| m * 0.2).collect();
        let advantages = vec![1.5f32; 27];
        let reference = (logprobs.detach() - 0.3).unwrap();
        let old = logprobs.detach();
        let terms = TokenTerms {
            logprobs: &logprobs,
            old_logprobs: &old,
            ref_logprobs: Some(&reference),
            advantages: &advantages,
            weights: &weights,
            importance: &[1.0; 27],
        };
        (grpo_loss(&terms, &objective).unwrap().0, logprobs)
    };
    // The production path reads nothing after the reflection: the retry
    // request and the retry may be anything, and the trained log-probs are
    // the same bit for bit; a reflection token changed changes them.
    let production = |ids: Vec<u32>| -> Vec<f32> {
        let rollout = rollout_of(&ids, reflection.clone());
        let groups = [Group::new(vec![rollout], true)];
        let spans = trained_spans(&groups, TrainOn::Reflection, LossType::Grpo, 64);
        span_logprobs(&model, &spans[0], 1.0, false)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let before = production(ids.clone());
    assert_eq!(before.len(), reflection.len());
    let mut other_retry = ids.clone();
    other_retry[20..]
        .iter_mut()
        .for_each(|t| *t = (*t * 7 + 3) % 260);
    assert_eq!(
        production(other_retry),
        before,
        "the retry leaked into the loss"
    );
    let mut other_reflection = ids.clone();
    other_reflection[17] = (ids[17] + 1) % 260;
    assert_ne!(
        production(other_reflection),
        before,
        "the reflection is not read"
    );

    // The efficient path (shared prefix, reflection positions only) computes
    // the same log-probs and the same parameter gradients.
    let (loss, logprobs) = masked_loss(&logits);
    let grads = loss.backward().unwrap();
    let fast = span_logprobs(&model, &spans[0], 1.0, true).unwrap();
    let full: Vec<f32> = logprobs.to_vec1().unwrap();
    let fast_values: Vec<f32> = fast.to_vec1().unwrap();
    for (i, v) in fast_values.iter().enumerate() {
        assert!(
            (v - full[reflection.start - 1 + i]).abs() < 1e-4,
            "token {i}: {v} vs {}",
            full[reflection.start - 1 + i]
        );
    }
    let w: Vec<f32> = vec![0.2; 5];
    let adv = vec![1.5f32; 5];
    let fast_ref = (fast.detach() - 0.3).unwrap();
    let terms = TokenTerms {
        logprobs: &fast,
        old_logprobs: &fast.detach(),
        ref_logprobs: Some(&fast_ref),
        advantages: &adv,
        weights: &w,
        importance: &[1.0; 5],
    };
    let (fast_loss, _) = grpo_loss(&terms, &objective).unwrap();
    let fast_grads = fast_loss.backward().unwrap();
    for (name, var) in &vars {
        let (a, b) = (
            grads.get(var.as_tensor()).unwrap(),
            fast_grads.get(var.as_tensor()).unwrap(),
        );
        let diff = max_abs(&(a - b).unwrap()).unwrap();
        let scale = max_abs(a).unwrap();
        assert!(
            diff <= 1e-3 * scale.max(1e-6),
            "{name}: gradients differ by {diff} (scale {scale})"
        );
    }
}

fn comparable(line: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.retain(|k, _| !k.starts_with("seconds_") && k != "tokens_per_s");
    v
}

#[test]
fn a_resumed_run_matches_an_uninterrupted_one() {
    resume_matches(false);
}

#[test]
fn a_resumed_lora_run_matches_an_uninterrupted_one() {
    resume_matches(true);
}

fn resume_matches(lora: bool) {
    let toy = common::toy();
    let config = |dir: &std::path::Path, steps: usize| TrainConfig {
        use_peft: lora,
        output_dir: dir.to_path_buf(),
        max_steps: steps,
        failures_per_step: 2,
        num_generations: 4,
        temperature: 1.0,
        top_k: 4,
        max_completion_length: 1,
        retry_max_tokens: 1,
        beta: 0.04,
        learning_rate: 2e-4,
        save_steps: 2,
        seed: 5,
        ..TrainConfig::default()
    };
    let train = |dir: &std::path::Path, steps: usize, resume: Option<&std::path::Path>| {
        // A full checkpoint is the model to continue; a LoRA one holds the
        // adapter, continued on the same base.
        let start = resume.filter(|_| !lora).map(|c| r3_model::load(c).unwrap());
        Trainer::new(
            config(dir, steps),
            start.as_ref().unwrap_or(&toy.loaded),
            StartWeights {
                policy: start.as_ref().unwrap_or(&toy.loaded).weights.clone(),
                reference: Some(toy.loaded.weights.clone()),
            },
            &toy.task,
            common::prompts(),
            toy.failures.clone(),
            resume,
        )
        .unwrap()
        .run(&mut |_| {})
        .unwrap();
    };
    let whole = tempfile::tempdir().unwrap();
    train(whole.path(), 4, None);
    let parts = tempfile::tempdir().unwrap();
    // A run killed after logging step 3 but before checkpointing it: its
    // resumption from checkpoint-2 redoes step 3, logged once.
    train(parts.path(), 3, None);
    train(parts.path(), 4, Some(&parts.path().join("checkpoint-2")));
    let steps = |name: &str| -> Vec<u64> {
        let mut steps: Vec<u64> = std::fs::read_to_string(parts.path().join(name))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        steps.dedup();
        steps
    };
    assert_eq!(steps("metrics.jsonl"), [1, 2, 3, 4]);
    assert_eq!(steps("samples.jsonl"), [1, 2, 3, 4]);

    let read = |dir: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(comparable)
            .collect()
    };
    let (a, b) = (read(whole.path()), read(parts.path()));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "resumed metrics differ");
    assert!(
        a.iter().any(|m| m["grad_norm"].as_f64().unwrap() > 0.0),
        "the run should have trained"
    );
    let weights = |dir: &std::path::Path| match lora {
        true => Adapter::load(&dir.join("checkpoint-4")).unwrap().weights,
        false => r3_model::load(&dir.join("checkpoint-4")).unwrap().weights,
    };
    let (final_a, final_b) = (weights(whole.path()), weights(parts.path()));
    assert!(final_a.names().count() > 0);
    for name in final_a.names() {
        let dims = final_a.dims(name).unwrap();
        let a = final_a.get(name, dims).unwrap();
        let b = final_b.get(name, dims).unwrap();
        let same = a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(same, "{name}: final weights differ");
    }
}

#[test]
fn empty_or_too_small_failure_sets_are_rejected() {
    let toy = common::toy();
    let out = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        output_dir: out.path().to_path_buf(),
        failures_per_step: 8,
        beta: 0.0,
        ..TrainConfig::default()
    };
    let err = |config: &TrainConfig, failures| match Trainer::new(
        config.clone(),
        &toy.loaded,
        StartWeights::of(&toy.loaded),
        &toy.task,
        common::prompts(),
        failures,
        None,
    ) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err(&config, Vec::new()).contains("dataset of failures is empty"));
    assert!(err(&config, toy.failures.clone())
        .contains("'failures_per_step' (8) is larger than the dataset of failures (4)"));
    // Failures mined for the toy task, trained as Countdown.
    let countdown = r3_tasks::builtin("countdown").unwrap();
    let e = match Trainer::new(
        config.clone(),
        &toy.loaded,
        StartWeights::of(&toy.loaded),
        countdown.as_ref(),
        common::prompts(),
        toy.failures.clone(),
        None,
    ) {
        Ok(_) => panic!("accepted failures of another task"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("does not fit the task 'countdown'"), "{e}");
    // max_failure_rate keeps the failures the model sometimes solves.
    let mut rated = toy.failures.clone();
    for (f, rate) in rated.iter_mut().zip([1.0, 0.75, 0.5, 0.25]) {
        f.failure_rate = rate;
    }
    let config = TrainConfig {
        max_failure_rate: 0.5,
        ..config
    };
    let e = err(&config, rated.clone());
    assert!(e.contains("larger than the dataset of failures (2)"), "{e}");
    let none = TrainConfig {
        max_failure_rate: 0.2,
        ..config
    };
    let e = err(&none, rated);
    assert!(
        e.contains("'max_failure_rate' = 0.2 keeps none of the 4"),
        "{e}"
    );
}

/// A fresh run never mixes with an old one in its output_dir, a resumed
/// one never continues with other settings, and temporary checkpoints a
/// kill left behind are removed.
#[test]
fn output_directories_and_resumes_are_checked() {
    use r3_train::checkpoint::{last_checkpoint, prepare_output_dir};
    let toy = common::toy();
    let dir = tempfile::tempdir().unwrap();
    let config = |seed: u64| TrainConfig {
        output_dir: dir.path().to_path_buf(),
        max_steps: 1,
        failures_per_step: 2,
        num_generations: 2,
        max_completion_length: 1,
        retry_max_tokens: 1,
        beta: 0.0,
        seed,
        ..TrainConfig::default()
    };
    let trainer = |config: TrainConfig, resume: Option<&std::path::Path>| {
        Trainer::new(
            config,
            &toy.loaded,
            StartWeights::of(&toy.loaded),
            &toy.task,
            common::prompts(),
            toy.failures.clone(),
            resume,
        )
    };
    assert_eq!(last_checkpoint(dir.path()).unwrap(), None);
    prepare_output_dir(dir.path(), false, false).unwrap();
    trainer(config(5), None).unwrap().run(&mut |_| {}).unwrap();
    let last = last_checkpoint(dir.path()).unwrap().unwrap();
    assert!(last.ends_with("checkpoint-1"));
    // A kill between the checkpoint's rename and the pointer's write: the
    // checkpoint is still found.
    let pointer = dir.path().join("last");
    let pointed = std::fs::read(&pointer).unwrap();
    std::fs::remove_file(&pointer).unwrap();
    assert_eq!(last_checkpoint(dir.path()).unwrap(), Some(last.clone()));
    std::fs::write(&pointer, pointed).unwrap();

    let stale = dir.path().join(".checkpoint-7.tmp");
    std::fs::create_dir(&stale).unwrap();
    let e = prepare_output_dir(dir.path(), false, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("already holds a run") && e.contains("checkpoint-1"),
        "{e}"
    );
    assert!(!stale.exists(), "a kill's temporary checkpoint is removed");
    prepare_output_dir(dir.path(), true, false).unwrap();

    let e = match trainer(config(6), Some(&last)) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a changed seed was accepted on resume"),
    };
    assert!(e.contains("seed: 5 → 6"), "{e}");
    let mut longer = config(5);
    longer.max_steps = 2;
    assert!(trainer(longer, Some(&last)).is_ok(), "max_steps may grow");

    prepare_output_dir(dir.path(), false, true).unwrap();
    assert_eq!(
        last_checkpoint(dir.path()).unwrap(),
        None,
        "--overwrite cleared it"
    );
    assert!(!dir.path().join("metrics.jsonl").exists());
}
