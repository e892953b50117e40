//! Sampling and batched decoding on a tiny model the test builds itself,
//! on `R3_TEST_DEVICE` (the CPU unless set; see `r3_model::tiny`).

use r3_generate::{
    argmax, Completion, DecodeStream, FinishReason, Finished, Generator, Sampler, SamplingParams,
    Turn,
};
use r3_model::tiny::{max_abs, test_device, TinyModel};
use r3_model::{Architecture, KvCache, Llama, Tokenizer};

struct Fixture {
    model: Llama,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::new(Architecture::Llama, 64, 2, 11)
        .unwrap()
        .write_hf_dir(dir.path(), candle_core::DType::F32)
        .unwrap();
    let mut loaded = r3_model::load(dir.path()).unwrap();
    loaded.weights.set_device(test_device());
    Fixture {
        model: Llama::new(&loaded.config, &loaded.weights).unwrap(),
        tokenizer: loaded.tokenizer,
        eos: loaded.eos_token_ids,
        _dir: dir,
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 80, 81, 82, 83, 84],
        vec![9, 10],
        vec![100, 101, 102],
    ]
}

/// A row of a batch against the same row decoded alone: bit for bit on
/// the CPU, whose kernels give a row the same result at every batch size;
/// on a GPU, cuBLAS picks its kernels by the batch's shape, so the same
/// tokens with log-probs equal up to rounding.
fn assert_same_row(batched: &Completion, alone: &Completion, what: &str) {
    if test_device().is_cpu() {
        assert_eq!(batched, alone, "{what}");
        return;
    }
    assert_close_row(batched, alone, what);
}

/// The same tokens, text and finish, with log-probs equal up to rounding.
fn assert_close_row(batched: &Completion, alone: &Completion, what: &str) {
    assert_eq!(batched.tokens, alone.tokens, "{what}");
    assert_eq!(batched.text, alone.text, "{what}");
    assert_eq!(batched.finish, alone.finish, "{what}");
    let (b, a) = (batched.logprobs.as_ref(), alone.logprobs.as_ref());
    assert_eq!(b.map(Vec::len), a.map(Vec::len), "{what}");
    for (x, y) in b.into_iter().flatten().zip(a.into_iter().flatten()) {
        assert!((x - y).abs() <= 1e-5, "{what}: log-prob {x} vs {y}");
    }
}

#[test]
fn same_seed_same_output_and_rows_independent_of_the_batch() {
    let f = fixture();
    let g = Generator::new(&f.model, &f.tokenizer, &f.eos);
    // The tiny model's tied embeddings make it very sure of itself: a high
    // temperature gives the sampler something to choose between.
    let params = SamplingParams {
        temperature: 20.0,
        top_p: 0.95,
        top_k: 50,
        max_new_tokens: 12,
        seed: 42,
        ..Default::default()
    };
    let a = g.generate(&prompts(), &params).unwrap();
    let b = g.generate(&prompts(), &params).unwrap();
    assert_eq!(a, b);
    // Row 0 alone, with the same stream, samples the same tokens.
    let alone = g.generate(&prompts()[..1], &params).unwrap();
    assert_same_row(&a[0], &alone[0], "row 0");
    let other = g
        .generate(
            &prompts(),
            &SamplingParams {
                seed: 43,
                ..params.clone()
            },
        )
        .unwrap();
    assert_ne!(a, other, "a different seed should sample differently");
}

#[test]
fn rows_that_finish_early_leave_the_others_sampling_as_if_alone() {
    let f = fixture();
    let g = Generator::new(&f.model, &f.tokenizer, &f.eos);
    let params = SamplingParams {
        temperature: 20.0,
        max_new_tokens: 16,
        // Common letters, so that rows stop at different steps.
        stop_strings: ["a", "e", "o", "t"].map(String::from).to_vec(),
        seed: 7,
        ..Default::default()
    };
    let batch: Vec<Vec<u32>> = (0..6).map(|r| vec![5 + r, 80 + 3 * r, 81]).collect();
    let together = g.generate(&batch, &params).unwrap();
    let lengths: Vec<usize> = together.iter().map(|c| c.tokens.len()).collect();
    assert!(
        lengths.iter().any(|&l| l < params.max_new_tokens)
            && lengths.windows(2).any(|w| w[0] != w[1]),
        "rows should finish at different steps: {lengths:?}"
    );
    for (r, prompt) in batch.iter().enumerate() {
        let mut cache = KvCache::new(&f.model.config, 1, 32);
        let logits = g.prefill(&mut cache, &[prompt]).unwrap();
        let sampler = Sampler::new(&params, r as u64);
        let alone = g
            .decode(cache, logits, &params, vec![sampler], false)
            .unwrap();
        assert_same_row(&together[r], &alone.completions[0], &format!("row {r}"));
    }
}

/// A wide batch prefills in narrower column chunks than one row does (so
/// that its activations stay in cache): each row's prompt, cut at other
/// columns, samples what it samples alone, with log-probs equal up to
/// rounding (a padded batch's standard: its attention sums run over other
/// lengths).
#[test]
fn a_wide_batch_prefilled_in_narrow_chunks_samples_as_each_row_alone() {
    let f = fixture();
    let g = Generator::new(&f.model, &f.tokenizer, &f.eos);
    let params = SamplingParams {
        temperature: 20.0,
        max_new_tokens: 4,
        seed: 3,
        ..Default::default()
    };
    // 40 rows: 32 columns a chunk, so the longest prompts take five chunks
    // together and one alone; lengths differ, so rows are left-padded.
    let batch: Vec<Vec<u32>> = (0..40)
        .map(|r| (0..90 + r).map(|i| 3 + (i * 11 + r) as u32 % 250).collect())
        .collect();
    let together = g.generate(&batch, &params).unwrap();
    for (r, prompt) in batch.iter().enumerate() {
        let mut cache = KvCache::new(&f.model.config, 1, 160);
        let logits = g.prefill(&mut cache, &[prompt]).unwrap();
        let sampler = Sampler::new(&params, r as u64);
        let alone = g
            .decode(cache, logits, &params, vec![sampler], false)
            .unwrap();
        assert_close_row(&together[r], &alone.completions[0], &format!("row {r}"));
    }
}

#[test]
fn greedy_batched_equals_an_argmax_loop_per_row() {
    let f = fixture();
    let g = Generator::new(&f.model, &f.tokenizer, &f.eos);
    let params = SamplingParams {
        max_new_tokens: 10,
        ..Default::default()
    };
    let batched = g.generate(&prompts(), &params).unwrap();
    for (prompt, completion) in prompts().iter().zip(&batched) {
        let mut cache = KvCache::new(&f.model.config, 1, 32);
        let mut ids = prompt.clone();
        let mut out = Vec::new();
        let mut hidden = f.model.forward(&[&ids], &mut cache).unwrap();
        for _ in 0..10 {
            let logits: Vec<f32> = f
                .model
                .last_logits(&hidden)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let next = argmax(&logits);
            out.push(next);
            if f.eos.contains(&next) {
                break;
            }
            ids.push(next);
            hidden = f.model.forward(&[&[next]], &mut cache).unwrap();
        }
        assert_eq!(completion.tokens, out);
    }
}

#[test]
fn finish_reasons_and_stop_strings() {
    let f = fixture();
    let g = Generator::new(&f.model, &f.tokenizer, &f.eos);
    let params = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 7,
        seed: 1,
        ..Default::default()
    };
    for c in g.generate(&prompts(), &params).unwrap() {
        match c.finish {
            FinishReason::Length => assert_eq!(c.tokens.len(), 7),
            FinishReason::Eos => assert!(f.eos.contains(c.tokens.last().unwrap())),
            FinishReason::Stop => panic!("no stop strings were given"),
        }
    }
    // Stop at whatever text the first unconstrained completion produced.
    let free = g
        .generate(
            &prompts()[..1],
            &SamplingParams {
                max_new_tokens: 30,
                ..params.clone()
            },
        )
        .unwrap();
    let text = f.tokenizer.decode(&free[0].tokens).unwrap();
    let stop: String = text.chars().skip(3).take(2).collect();
    let stopped = g
        .generate(
            &prompts()[..1],
            &SamplingParams {
                max_new_tokens: 30,
                stop_strings: vec![stop.clone()],
                ..params
            },
        )
        .unwrap();
    assert_eq!(stopped[0].finish, FinishReason::Stop);
    assert!(!stopped[0].text.contains(&stop));
    assert!(text.starts_with(&stopped[0].text));
}

#[test]
fn a_kept_cache_continues_like_a_fresh_prefill() {
    let f = fixture();
    let g = Generator::new(&f.model, &f.tokenizer, &f.eos);
    let params = SamplingParams {
        temperature: 0.9,
        max_new_tokens: 6,
        seed: 3,
        ..Default::default()
    };
    let mut cache = KvCache::new(&f.model.config, 1, 16);
    let logits = g.prefill(&mut cache, &[&prompts()[0]]).unwrap();
    // Fork the prompt four ways, as the G reflections of one failure are.
    let forked = cache.select_rows(&[0, 0, 0, 0], 16).unwrap();
    let logits = logits
        .broadcast_as((4, logits.dim(1).unwrap()))
        .unwrap()
        .contiguous()
        .unwrap();
    let samplers = (0..4).map(|r| Sampler::new(&params, r)).collect();
    let out = g.decode(forked, logits, &params, samplers, true).unwrap();
    let mut merged = out.cache.unwrap();
    let last: Vec<[u32; 1]> = out
        .completions
        .iter()
        .map(|c| [*c.tokens.last().unwrap()])
        .collect();
    let segs: Vec<&[u32]> = last.iter().map(|t| t.as_slice()).collect();
    let continued = f
        .model
        .last_logits(&f.model.forward(&segs, &mut merged).unwrap())
        .unwrap();
    for (r, c) in out.completions.iter().enumerate() {
        let history = [prompts()[0].clone(), c.tokens.clone()].concat();
        let mut fresh = KvCache::new(&f.model.config, 1, 16);
        let expected = f
            .model
            .last_logits(&f.model.forward(&[&history], &mut fresh).unwrap())
            .unwrap();
        let diff =
            max_abs(&(continued.get(r).unwrap() - expected.get(0).unwrap()).unwrap()).unwrap();
        assert!(diff < 1e-4, "row {r}: {diff}");
    }
}

#[test]
fn sampler_candidates_match_a_full_sort() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for case in 0..200 {
        let vocab = rng.random_range(2..3000);
        let spread = rng.random_range(0.1f32..20.0);
        let logits: Vec<f32> = (0..vocab).map(|_| rng.random::<f32>() * spread).collect();
        let top_k = if case % 3 == 0 {
            0
        } else {
            rng.random_range(1..vocab + 5)
        };
        let top_p: f64 = if case % 4 == 0 {
            1.0
        } else {
            rng.random_range(0.01..1.0)
        };
        let params = SamplingParams {
            temperature: 0.7,
            top_k,
            top_p,
            ..Default::default()
        };
        // Expected support: sort all, keep k, keep the nucleus.
        let max = logits.iter().copied().fold(f32::MIN, f32::max);
        let mut probs: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (((l - max) / 0.7).exp(), i as u32))
            .collect();
        let total: f32 = probs.iter().map(|p| p.0).sum();
        probs.iter_mut().for_each(|p| p.0 /= total);
        probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        if top_k > 0 {
            probs.truncate(top_k);
        }
        let mut cum = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cum += p.0;
                cum >= top_p as f32
            })
            .map_or(probs.len(), |i| i + 1);
        let support: std::collections::HashSet<u32> = probs[..keep].iter().map(|p| p.1).collect();
        let mut sampler = Sampler::new(&params, case);
        for _ in 0..50 {
            let t = sampler.sample(&logits);
            assert!(
                support.contains(&t),
                "case {case}: sampled {t} outside the top-k/top-p set"
            );
        }
    }
    // top_k = 1 is greedy.
    let logits = [0.1f32, 3.0, 2.9, -1.0];
    let mut s = Sampler::new(
        &SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        },
        0,
    );
    assert!((0..100).all(|_| s.sample(&logits) == 1));
}

#[test]
fn sampling_follows_the_softmax_distribution() {
    let logits = [0.0f32, 1.0, 2.0];
    let mut s = Sampler::new(
        &SamplingParams {
            temperature: 1.0,
            ..Default::default()
        },
        0,
    );
    let mut counts = [0usize; 3];
    let n = 60_000;
    for _ in 0..n {
        counts[s.sample(&logits) as usize] += 1;
    }
    let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
    for (i, &c) in counts.iter().enumerate() {
        let p = (logits[i] as f64).exp() / z;
        let freq = c as f64 / n as f64;
        assert!((freq - p).abs() < 0.01, "token {i}: {freq} vs {p}");
    }
}

/// A forward that fails says which step it was and on how many rows and
/// tokens (what an out-of-memory asks to make smaller).
#[test]
fn a_failed_forward_names_its_step_and_batch() {
    let f = fixture();
    let g = Generator::new(&f.model, &f.tokenizer, &f.eos);
    let params = SamplingParams {
        max_new_tokens: 2,
        ..Default::default()
    };
    let outside = f.model.config.vocab_size as u32 + 5;
    let err = g
        .generate(&[vec![5, 6, outside], vec![7]], &params)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("prefill of 2 rows × 3 tokens: "), "{err}");
    assert!(err.contains(&outside.to_string()), "{err}");
}

/// Each drawn token's log-prob is its log-probability under the
/// distribution it was drawn from, computed here in f64 from the logits:
/// temperature-scaled softmax; renormalised over the top-k/top-p set; and
/// for greedy rows that ask, the plain log-softmax at the argmax.
#[test]
fn drawn_log_probs_are_those_of_the_sampling_distribution() {
    let logits = [0.5f32, 2.0, 1.0, -1.0, 1.5];
    let log_softmax = |scale: f64, keep: &[usize]| -> Vec<f64> {
        let z: f64 = keep.iter().map(|&i| (logits[i] as f64 / scale).exp()).sum();
        (0..logits.len())
            .map(|i| (logits[i] as f64 / scale) - z.ln())
            .collect()
    };
    let all: Vec<usize> = (0..logits.len()).collect();
    let sampled = |params: SamplingParams, keep: &[usize]| {
        let expected = log_softmax(params.temperature, keep);
        let mut s = Sampler::new(&params, 3);
        for _ in 0..200 {
            let d = s.draw(&logits);
            let got = d.logprob.expect("a sampled row has its log-prob") as f64;
            let want = expected[d.token as usize];
            assert!(
                (got - want).abs() < 1e-5,
                "{params:?}: token {} {got} vs {want}",
                d.token
            );
        }
    };
    sampled(
        SamplingParams {
            temperature: 0.7,
            ..Default::default()
        },
        &all,
    );
    // top_k = 2 keeps tokens 1 and 4.
    sampled(
        SamplingParams {
            temperature: 1.3,
            top_k: 2,
            ..Default::default()
        },
        &[1, 4],
    );
    let greedy = SamplingParams::default();
    assert_eq!(Sampler::new(&greedy, 0).draw(&logits).logprob, None);
    let d = Sampler::new(&greedy, 0).with_logprobs().draw(&logits);
    assert_eq!(d.token, 1);
    let want = log_softmax(1.0, &all)[1];
    assert!((d.logprob.unwrap() as f64 - want).abs() < 1e-5);
}

/// Continuous batching: rows that join a running batch mid-way (one with
/// a prompt longer than a prefill chunk, fed a chunk per step while the
/// others decode) sample exactly what each samples alone; a kept row
/// resumed with a next turn continues exactly as the whole conversation
/// decoded from scratch.
#[test]
fn rows_joining_and_resuming_a_running_batch_sample_as_if_alone() {
    let f = fixture();
    let g = Generator::new(&f.model, &f.tokenizer, &f.eos);
    let params = SamplingParams {
        temperature: 20.0,
        max_new_tokens: 9,
        seed: 5,
        ..Default::default()
    };
    let long: Vec<u32> = (0..300).map(|i| 3 + (i * 7) % 250).collect();
    let prompts = [vec![5, 80, 81, 82], vec![9, 10], long, vec![100, 101, 102]];
    let turn = |key: usize, ids: Vec<u32>, keep: bool| Turn {
        key,
        ids,
        params: params.clone(),
        sampler: Sampler::new(&params, key as u64),
        keep,
        alternatives: 0,
    };
    let alone = |key: usize, prompt: &[u32]| {
        let mut cache = KvCache::new(&f.model.config, 1, 512);
        let logits = g.prefill(&mut cache, &[prompt]).unwrap();
        let sampler = Sampler::new(&params, key as u64);
        g.decode(cache, logits, &params, vec![sampler], false)
            .unwrap()
            .completions
            .remove(0)
    };

    let mut stream = DecodeStream::new(&g, 64);
    // Rows 0–3; slot 4 holds row 0's first turn once it resumes.
    let mut done: Vec<Option<Completion>> = vec![None; 5];
    let record = |finished: Vec<Finished>, done: &mut Vec<Option<Completion>>| {
        for fin in finished {
            done[fin.key] = Some(fin.completion);
        }
    };
    let mut seen = 0;
    stream
        .join(vec![turn(0, prompts[0].clone(), true)])
        .unwrap();
    for _ in 0..3 {
        let finished = stream.step(&mut |_, _, _| seen += 1).unwrap();
        record(finished, &mut done);
    }
    stream
        .join(vec![
            turn(1, prompts[1].clone(), false),
            turn(2, prompts[2].clone(), false),
        ])
        .unwrap();
    let next_turn = vec![120, 121, 122];
    let mut resumed = false;
    while !stream.is_idle() || !resumed {
        let finished = stream.step(&mut |_, _, _| seen += 1).unwrap();
        record(finished, &mut done);
        if done[0].is_some() && !resumed {
            // The kept row resumes under its own key, and its second
            // turn's completion comes back under it too: keep the first.
            done[4] = done[0].take();
            stream.resume(turn(0, next_turn.clone(), false)).unwrap();
            stream
                .join(vec![turn(3, prompts[3].clone(), false)])
                .unwrap();
            resumed = true;
        }
    }
    // Equal tokens, log-probs to float precision (the batch changes the
    // order of some sums).
    let same = |got: &Completion, expected: &Completion, what: &str| {
        assert_eq!(got.tokens, expected.tokens, "{what}");
        let (a, b) = (
            got.logprobs.as_ref().unwrap(),
            expected.logprobs.as_ref().unwrap(),
        );
        assert!(
            a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4),
            "{what}: {a:?} vs {b:?}"
        );
    };
    let first = done[4].take().unwrap();
    same(&first, &alone(0, &prompts[0]), "row 0's first turn");
    for key in 0..4 {
        let got = done[key].as_ref().unwrap();
        let expected = match key {
            0 => {
                // The whole conversation from scratch: prompt, first turn,
                // next turn; sampled with row 0's stream afresh.
                let whole = [prompts[0].clone(), first.tokens.clone(), next_turn.clone()].concat();
                alone(0, &whole)
            }
            _ => alone(key, &prompts[key]),
        };
        same(got, &expected, &format!("row {key}"));
    }
    assert_eq!(seen, 9 * 5, "on_token sees every sampled token");
}

/// The alternatives reported beside a sampled token come from the
/// distribution it was drawn from: most likely first, the drawn token's
/// log-prob among them where it is one of them, and all of them a whole
/// distribution (greedy: the plain log-softmax; sampled: after
/// temperature; with top-k / top-p: renormalised over what they keep).
#[test]
fn alternatives_are_the_drawn_distributions_most_likely_tokens() {
    let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 50) as f32 / 7.0).collect();
    for (temperature, top_k, top_p) in [(0.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (0.9, 0, 0.8)]
    {
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: 9,
            ..Default::default()
        };
        for row in 0..20 {
            let mut sampler = Sampler::new(&params, row).with_logprobs();
            let drawn = sampler.draw(&logits);
            let all = sampler.alternatives(&logits, 50);
            let what = format!("T {temperature} top_k {top_k} top_p {top_p}");
            assert!(
                all.windows(2).all(|w| w[0].1 >= w[1].1),
                "{what}: not sorted"
            );
            let mass: f32 = all.iter().map(|(_, l)| l.exp()).sum();
            assert!((mass - 1.0).abs() < 1e-4, "{what}: mass {mass}");
            let own = all
                .iter()
                .find(|(t, _)| *t == drawn.token)
                .expect("drawn is kept");
            assert!((own.1 - drawn.logprob.unwrap()).abs() < 1e-6, "{what}");
            assert_eq!(
                sampler.alternatives(&logits, 3),
                all[..3].to_vec(),
                "{what}"
            );
        }
    }
}

/// Scoring a prompt's own tokens (`echo`) agrees with decoding: a greedy
/// completion, scored as part of the prompt, gets the log-probs its
/// sampler reported, and each of its tokens is the top alternative where
/// it was sampled; a prompt longer than a prefill chunk scores the same.
#[test]
fn a_scored_prompt_agrees_with_greedy_decoding() {
    let f = fixture();
    let g = Generator::new(&f.model, &f.tokenizer, &f.eos);
    let params = SamplingParams {
        max_new_tokens: 6,
        ..Default::default()
    };
    let prompt: Vec<u32> = (0..300).map(|i| 3 + (i * 11) % 250).collect();
    let mut cache = KvCache::new(&f.model.config, 1, 400);
    let logits = g.prefill(&mut cache, &[&prompt]).unwrap();
    let sampler = Sampler::new(&params, 0).with_logprobs();
    let greedy = g
        .decode(cache, logits, &params, vec![sampler], false)
        .unwrap()
        .completions
        .remove(0);
    let whole = [prompt.clone(), greedy.tokens.clone()].concat();
    let scored = g.prompt_logprobs(&whole, 2).unwrap();
    assert_eq!(scored.logprobs.len(), whole.len() - 1);
    assert_eq!(scored.alternatives.len(), whole.len() - 1);
    let sampled = greedy.logprobs.as_ref().unwrap();
    for (i, &token) in greedy.tokens.iter().enumerate() {
        let at = prompt.len() - 1 + i;
        assert!(
            (scored.logprobs[at] - sampled[i]).abs() < 1e-4,
            "token {i}: {} vs {}",
            scored.logprobs[at],
            sampled[i]
        );
        assert_eq!(scored.alternatives[at][0].0, token, "token {i}");
        assert!(scored.alternatives[at][0].1 >= scored.alternatives[at][1].1);
    }
}
