//! The `r3` binary driven from outside, as users and scripts drive it:
//! verdicts, data, reports, bad input, benchmarks at shipped shapes.

mod common;

use common::{r3, tiny_model_and_data, QUICK_BENCH_KERNELS};

#[test]
fn verify_prints_one_json_verdict() {
    let (ok, out, _) = r3(&[
        "verify",
        "--task",
        "countdown",
        "--record",
        r#"{"nums":[3,7,25],"target":46}"#,
        "--answer",
        "<answer>3*7+25</answer>",
    ]);
    assert!(ok);
    assert_eq!(out.trim(), r#"{"success":true,"reason":"correct"}"#);
    let (ok, out, _) = r3(&[
        "verify",
        "--task",
        "countdown",
        "--record",
        r#"{"nums":[3,7,25],"target":46}"#,
        "--answer",
        "<answer>4*7+25</answer>",
    ]);
    assert!(ok, "a failed verdict is still a successful command");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["success"], false);
    assert_eq!(v["reason"], "uses 4, which is not in [3, 7, 25]");
}

#[test]
fn verify_reads_records_from_data_files() {
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/function_calling.jsonl"
    );
    let (ok, out, err) = r3(&[
        "verify",
        "--task",
        "function-calling",
        "--data",
        data,
        "--index",
        "0",
        "--answer",
        r#"[{"name": "get_weather", "arguments": {"city": "Lisbon"}}]"#,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains(r#""success":true"#));
    let (ok, _, err) = r3(&[
        "verify",
        "--task",
        "function-calling",
        "--data",
        data,
        "--index",
        "9999",
        "--answer",
        "[]",
    ]);
    assert!(!ok && err.contains("there is no record 9999"), "{err}");
}

#[test]
fn bad_input_gets_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"nums\": [1, 2], \"target\": 3}\n{\"nums\": oops}\n",
    )
    .unwrap();
    let (ok, _, err) = r3(&[
        "verify",
        "--task",
        "countdown",
        "--data",
        bad.to_str().unwrap(),
        "--index",
        "0",
        "--answer",
        "x",
    ]);
    assert!(!ok);
    assert!(
        err.contains("bad.jsonl:2") && err.contains("invalid JSON"),
        "{err}"
    );
    let (ok, _, err) = r3(&[
        "verify", "--task", "chess", "--record", "{}", "--answer", "x",
    ]);
    assert!(!ok && err.contains("unknown task 'chess'"), "{err}");
    let (ok, _, err) = r3(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "hi",
    ]);
    assert!(!ok && err.contains("/nonexistent/model"), "{err}");
    // The cause is said once (the message holds it; the chain must not
    // repeat it).
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{").unwrap();
    let (ok, _, err) = r3(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!ok && err.contains("config.json: invalid JSON"), "{err}");
    assert_eq!(err.matches("EOF while parsing").count(), 1, "{err}");
}

#[test]
fn countdown_data_is_deterministic_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.jsonl");
    let b = dir.path().join("b.jsonl");
    for path in [&a, &b] {
        let (ok, _, err) = r3(&[
            "data",
            "countdown",
            "--count",
            "20",
            "--numbers",
            "3..=4",
            "--seed",
            "5",
            "--out",
            path.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
    }
    let text = std::fs::read_to_string(&a).unwrap();
    assert_eq!(text, std::fs::read_to_string(&b).unwrap());
    assert_eq!(text.lines().count(), 20);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let answer = format!("<answer>{}</answer>", first["solution"].as_str().unwrap());
    let (ok, out, _) = r3(&[
        "verify",
        "--task",
        "countdown",
        "--data",
        a.to_str().unwrap(),
        "--index",
        "0",
        "--answer",
        &answer,
    ]);
    assert!(ok && out.contains(r#""success":true"#), "{out}");
}

/// Artifacts as r3 writes them (the typed structs, serialised): `report`
/// reads them back typed, so a renamed or missing field is an error naming
/// the file, never a silent 0.
#[test]
fn report_draws_charts_and_compares_evaluations() {
    use r3_loop::eval::{EvalSettings, EvalSummary, Transcript};
    use r3_loop::stats::Proportion;
    use r3_loop::Attempt;
    use r3_train::metrics::StepMetrics;

    let dir = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for step in 1..=3 {
        let m = StepMetrics {
            step,
            reward_mean: 0.1 * step as f64,
            kl: 1e-4 * step as f64,
            loss: -0.01,
            reflection_length: 40.0 + step as f64,
            tokens_per_s: 100.0,
            groups: 4,
            zero_signal_groups: 1,
            seconds_step: 20.0,
            ..Default::default()
        };
        lines.push_str(&format!("{}\n", serde_json::to_string(&m).unwrap()));
    }
    std::fs::write(dir.path().join("metrics.jsonl"), lines).unwrap();
    let (ok, out, err) = r3(&["report", dir.path().to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("| steps | 3 |") && out.contains("0.100 → 0.300"),
        "{out}"
    );
    let png = std::fs::read(dir.path().join("training.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    let attempt = |ok: bool| Attempt {
        tokens: vec![1, 2],
        text: "x".into(),
        finish: r3_generate::FinishReason::Eos,
        verdict: if ok {
            r3_tasks::Verdict::pass()
        } else {
            r3_tasks::Verdict::fail("no")
        },
    };
    for (name, correct) in [("a", 10), ("b", 15)] {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let greedy = r3_generate::SamplingParams::default();
        let summary = EvalSummary {
            n: 40,
            first_try_accuracy: correct as f64 / 40.0,
            second_try_accuracy: (correct + 2) as f64 / 40.0,
            first_try: Proportion::new(correct, 40),
            second_try: Proportion::new(correct + 2, 40),
            fixed_by_retry: 2,
            int8_decode: false,
            bf16_products: false,
            settings: EvalSettings {
                attempt: greedy.clone(),
                reflection: greedy.clone(),
                retry: greedy,
            },
        };
        std::fs::write(
            d.join("summary.json"),
            serde_json::to_string(&summary).unwrap(),
        )
        .unwrap();
        // Records 1..=correct succeed first try, the next two on the retry.
        let transcripts: String = (1..=40)
            .map(|line: usize| {
                let fixed = line > correct && line <= correct + 2;
                let t = Transcript {
                    line,
                    record: serde_json::json!({"prompt": "p"}),
                    attempt: attempt(line <= correct),
                    reflection: (line > correct).then(|| "r".to_string()),
                    retry: (line > correct).then(|| attempt(fixed)),
                };
                format!("{}\n", serde_json::to_string(&t).unwrap())
            })
            .collect();
        std::fs::write(d.join("transcripts.jsonl"), transcripts).unwrap();
    }
    let compare = || {
        r3(&[
            "report",
            "--compare",
            dir.path().join("a").to_str().unwrap(),
            dir.path().join("b").to_str().unwrap(),
        ])
    };
    let (ok, out, err) = compare();
    assert!(ok, "{err}");
    assert!(
        out.contains("| first try | 25.0% (10/40)") && out.contains("37.5% (15/40)"),
        "{out}"
    );
    // Paired: B alone solves 5 records in each row, A none: p = 2 / 2^5.
    assert!(
        out.contains("| 0 / 5 | 0.062 |") && out.matches("| 0 / 5 |").count() == 2,
        "{out}"
    );
    // Evaluations of different records cannot be paired.
    let b = dir.path().join("b/transcripts.jsonl");
    let text = std::fs::read_to_string(&b).unwrap();
    std::fs::write(&b, text.replace("\"line\":40", "\"line\":41")).unwrap();
    let (ok, _, err) = compare();
    assert!(!ok && err.contains("evaluated different records"), "{err}");
    // A renamed field is named with its file, not read as 0.
    let summary = dir.path().join("b/summary.json");
    let text = std::fs::read_to_string(&summary).unwrap();
    std::fs::write(&summary, text.replace("\"first_try\"", "\"first\"")).unwrap();
    let (ok, _, err) = compare();
    assert!(
        !ok && err.contains("summary.json") && err.contains("first_try"),
        "{err}"
    );
    let metrics = dir.path().join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).unwrap();
    std::fs::write(&metrics, text.replace("\"reward_mean\"", "\"reward\"")).unwrap();
    let (ok, _, err) = r3(&["report", dir.path().to_str().unwrap()]);
    assert!(
        !ok && err.contains("metrics.jsonl:1") && err.contains("reward_mean"),
        "{err}"
    );
}

/// Values that used to panic: each is a clear error, or (a token budget
/// past the context) capped with a note.
#[test]
fn values_that_used_to_panic() {
    for timeout in ["-1", "NaN", "inf", "1e300", "0"] {
        let (ok, _, err) = r3(&[
            "verify",
            "--verifier",
            "cat",
            &format!("--verifier-timeout={timeout}"),
            "--record",
            r#"{"prompt": "p"}"#,
            "--answer",
            "x",
        ]);
        assert!(
            !ok && err.contains("--verifier-timeout"),
            "{timeout}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = tiny_model_and_data(dir.path(), 4, "1");
    let out = dir.path().join("eval");
    let (ok, _, err) = r3(&[
        "eval",
        "--model",
        &model,
        "--task",
        "answer",
        "--data",
        &data,
        "--reflection-max-tokens",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("--reflection-max-tokens must be at least 1"),
        "{err}"
    );
    let (ok, _, err) = r3(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "hi",
        "--max-new-tokens",
        "100000000000",
    ]);
    assert!(ok && err.contains("past the model's context"), "{err}");
    let (ok, _, err) = r3(&[
        "eval",
        "--model",
        &model,
        "--task",
        "answer",
        "--data",
        &data,
        "--out",
        "/proc/not-writable/eval",
    ]);
    assert!(!ok && err.contains("cannot write into --out"), "{err}");
    for rounding in ["--int8-decode", "--bf16-products"] {
        let (ok, _, err) = r3(&[
            "mine",
            "--model",
            &model,
            "--task",
            "answer",
            "--data",
            &data,
            rounding,
            "--engine",
            "http://127.0.0.1:9",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            !ok && err.contains("--int8-decode and --bf16-products are for r3's own decoder"),
            "{rounding}: {err}"
        );
    }
}

/// The shipped shapes are the published models': their parameter counts
/// (Qwen2.5-1.5B: 1.54B; Qwen2.5-7B: 7.61B, untied output).
#[test]
fn shipped_shapes_have_the_published_parameter_counts() {
    let configs = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs");
    for (name, billions) in [("Qwen2.5-1.5B", 1.54), ("Qwen2.5-7B", 7.61)] {
        let path = std::path::Path::new(configs).join(format!("{name}.json"));
        let c = r3_model::ModelConfig::from_hf_file(&path).unwrap();
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let h = c.hidden_size;
        let layer = h * (q + 2 * kv) + (q + 2 * kv) + q * h + 3 * h * c.intermediate_size + 2 * h;
        let ends = c.vocab_size * h * if c.tie_word_embeddings { 1 } else { 2 };
        let total = (c.num_layers * layer + ends + h) as f64 / 1e9;
        assert!((total - billions).abs() < 0.01, "{name}: {total:.3}B");
    }
}

/// `--random-init` benchmarks a shape without its weights: a small
/// Qwen2-shaped config decodes the budget it was given.
#[test]
fn bench_generate_runs_a_random_init_shape() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("shape.json");
    let shape = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 49200, "tie_word_embeddings": true
    });
    std::fs::write(&config, shape.to_string()).unwrap();
    let config = config.to_str().unwrap();
    let (ok, out, err) = r3(&[
        "bench",
        "generate",
        "--random-init",
        config,
        "--prompt-tokens",
        "16",
        "--new-tokens",
        "5",
        "--limit-seconds",
        "0.05",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["model"], config, "{v}");
    // The machine's limits, and each phase as a fraction of its limit.
    for key in ["gemm_gflops", "read_gb_per_s"] {
        assert!(
            v["machine"][key].as_f64().is_some_and(|x| x > 0.0),
            "{key}: {v}"
        );
    }
    for key in ["prefill_fraction_of_limit", "decode_fraction_of_limit"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    // The exact count for this shape: h = 64, q = 64, kv = 32, mlp = 128,
    // 2 layers, vocabulary 49200; 16 prompt tokens, one row.
    let token = |c: f64| {
        2.0 * (2.0 * 64.0 * 128.0 + 2.0 * 64.0 * 64.0 + 6.0 * 64.0 * 128.0 + 4.0 * 64.0 * c)
    };
    let prefill: f64 = (1..=16).map(|i| token(i as f64)).sum::<f64>() + 2.0 * 64.0 * 49200.0;
    assert_eq!(v["work"]["prefill_flops"].as_f64().unwrap(), prefill, "{v}");
    // A shape whose vocabulary is smaller than the tokenizer's is refused.
    let small = dir.path().join("small.json");
    std::fs::write(&small, shape.to_string().replace("49200", "1000")).unwrap();
    let (ok, _, err) = r3(&[
        "bench",
        "generate",
        "--random-init",
        small.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("vocab_size 1000"), "{err}");
}

/// `r3 bench kernels` times every packed encoding in cache and streamed,
/// with the bits a weight each reads (K4 and K6 with their integer scales).
#[test]
fn bench_kernels_times_every_encoding() {
    let (ok, out, err) = r3(&QUICK_BENCH_KERNELS);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let encodings = v["encodings"].as_array().unwrap();
    let bits: Vec<(&str, f64)> = encodings
        .iter()
        .map(|e| {
            for place in ["in_cache", "streamed"] {
                assert!(e[place]["weights_per_s"].as_f64().unwrap() > 0.0, "{e}");
            }
            assert!(e["streamed"]["bytes"].as_u64().unwrap() >= 8 << 20, "{e}");
            assert!(
                e["streamed_fraction_of_limit"].as_f64().unwrap() > 0.0,
                "{e}"
            );
            // One input row: two FLOPs a weight.
            let (rate, gflops) = (
                e["in_cache"]["weights_per_s"].as_f64().unwrap(),
                e["in_cache"]["gflops"].as_f64().unwrap(),
            );
            assert!((gflops - 2.0 * rate / 1e9).abs() <= 1e-9 * gflops, "{e}");
            assert!(
                e["in_cache_fraction_of_gemm_peak"].as_f64().unwrap() > 0.0,
                "{e}"
            );
            (
                e["encoding"].as_str().unwrap(),
                e["bits_per_weight"].as_f64().unwrap(),
            )
        })
        .collect();
    let expected = [
        ("Q4_0", 4.5),
        ("Q4_1", 5.0),
        ("Q8_0", 8.5),
        ("F16", 16.0),
        ("Bf16", 16.0),
        ("K4", 4.75),
        ("K5", 5.75),
        ("K6", 6.625),
        ("Q5_0", 5.5),
        ("Q5_1", 6.0),
    ];
    assert_eq!(bits, expected, "{v}");
}

/// `r3 init` writes a random model of a shape, with the default model's
/// tokenizer, that loads; `r3 device-check` runs its whole comparison on
/// it (the CPU against itself here: no difference, and the compared
/// training step really moves the weights).
#[test]
fn init_writes_a_model_that_device_check_compares() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny");
    let (ok, _, err) = common::init_tiny(&out, &[]);
    assert!(ok, "{err}");
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(file).exists(), "{file}");
    }
    let (ok, stdout, err) =
        common::device_check(&out, "cpu", &["--batch", "3", "--new-tokens", "4"]);
    assert!(ok, "{err}");
    assert!(err.contains("device: cpu"), "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["logits_max_abs_diff"], 0.0, "{v}");
    assert_eq!(v["greedy_equal"], true, "{v}");
    let lengths = v["prompt_tokens"].as_array().unwrap();
    assert!(lengths[0].as_u64() < lengths[2].as_u64(), "{v}");
    // The sampled rollouts: 4 attempts and 4 reflect-and-retry rollouts,
    // whose reflections ended at different steps (rows were set aside).
    assert_eq!(v["rollout_equal"], true, "{v}");
    assert_eq!(v["rollout_sequences"], 8, "{v}");
    let reflections: Vec<u64> = v["rollout_reflection_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert!(reflections.iter().any(|&n| n != reflections[0]), "{v}");
    // The real trainer's step: reflection tokens trained, the same loss and
    // gradient norm on both sides, and weights really moved.
    assert!(v["train_tokens"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["train_loss"][0], v["train_loss"][1], "{v}");
    assert_eq!(v["train_grad_norm"][0], v["train_grad_norm"][1], "{v}");
    assert!(v["train_grad_norm"][0].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["update_max_abs"].as_f64().unwrap() > 1e-5, "{v}");
    assert_eq!(v["train_samples_equal"], true, "{v}");
    assert_eq!(v["update_relative_diff"], 0.0, "{v}");
    // At AdamW ε = 1 the update is the learning rate times the gradient,
    // well below the learning rate (ε = 1e-8 would make it ±lr, whose
    // signs flip on gradients at rounding level).
    let lr = v["train_lr"].as_f64().unwrap();
    assert!(v["update_max_abs"].as_f64().unwrap() < 0.5 * lr, "{v}");
    // bf16 really ran (its logits differ from f32's), within tolerance.
    let bf16 = v["bf16_logits_relative_diff"].as_f64().unwrap();
    assert!(bf16 > 0.0 && bf16 < 5e-2, "{v}");
    // Written in bf16, the weights take half the bytes and load as f32.
    let half = dir.path().join("tiny-bf16");
    let (ok, _, err) = common::init_tiny(&half, &["--dtype", "bf16"]);
    assert!(ok, "{err}");
    let size = |dir: &std::path::Path| dir.join("model.safetensors").metadata().unwrap().len();
    assert!(
        size(&half) * 2 < size(&out) + 4096,
        "{} {}",
        size(&half),
        size(&out)
    );
    let (ok, stdout, err) = common::device_check(&half, "cpu", &["--no-train"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("\"ok\":true"), "{stdout}");
    // An existing directory is never overwritten.
    let (ok, _, err) = common::init_tiny(&out, &[]);
    assert!(!ok);
    assert!(err.contains("exists"), "{err}");
}

/// `--device` names a device or fails before any work: an unknown name
/// lists the valid ones; CUDA from a build without it says how to get one.
#[test]
fn device_flag_is_validated() {
    let (ok, _, err) = r3(&["generate", "--device", "gpu", "--prompt", "hi"]);
    assert!(!ok);
    assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
    if cfg!(not(feature = "cuda")) {
        let (ok, _, err) = r3(&["generate", "--device", "cuda:1", "--prompt", "hi"]);
        assert!(!ok);
        assert!(err.contains("built without CUDA"), "{err}");
        let (ok, _, err) = r3(&["train", "--set", "device=\"tpu\""]);
        assert!(!ok);
        assert!(
            err.contains("device=\"tpu\"") && err.contains("unknown device 'tpu'"),
            "{err}"
        );
    }
}
