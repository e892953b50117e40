//! The `r3` binary driven from outside, as users and scripts drive it.

use std::process::Command;

fn r3(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_r3"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

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

#[test]
fn report_draws_charts_and_compares_evaluations() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for step in 1..=3 {
        let m = serde_json::json!({
            "step": step, "reward_mean": 0.1 * step as f64, "kl": 1e-4 * step as f64, "loss": -0.01,
            "reflection_length": 40.0 + step as f64, "tokens_per_s": 100.0, "groups": 4, "zero_signal_groups": 1,
            "seconds_step": 20.0, "seconds_generation": 12.0, "seconds_forward_backward": 6.0, "seconds_optimizer": 1.0,
        });
        lines.push_str(&format!("{m}\n"));
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

    for (name, correct) in [("a", 10), ("b", 15)] {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let p = |c: usize| serde_json::json!({"correct": c, "n": 40, "accuracy": c as f64 / 40.0, "low": 0.1, "high": 0.5});
        let summary = serde_json::json!({"n": 40, "first_try": p(correct), "second_try": p(correct + 2), "fixed_by_retry": 2});
        std::fs::write(d.join("summary.json"), summary.to_string()).unwrap();
        // Records 1..=correct succeed first try, the next two on the retry.
        let transcripts: String = (1..=40)
            .map(|line: usize| {
                let verdict = |ok: bool| serde_json::json!({"verdict": {"success": ok}});
                let fixed = line > correct && line <= correct + 2;
                let retry = (line > correct).then(|| verdict(fixed));
                format!("{}\n", serde_json::json!({"line": line, "attempt": verdict(line <= correct), "retry": retry}))
            })
            .collect();
        std::fs::write(d.join("transcripts.jsonl"), transcripts).unwrap();
    }
    let (ok, out, err) = r3(&[
        "report",
        "--compare",
        dir.path().join("a").to_str().unwrap(),
        dir.path().join("b").to_str().unwrap(),
    ]);
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
    let (ok, _, err) = r3(&[
        "report",
        "--compare",
        dir.path().join("a").to_str().unwrap(),
        dir.path().join("b").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("evaluated different records"), "{err}");
}

/// A tiny random HF model (it fails nearly everything) and `n` arithmetic
/// records, in `dir`. Its embeddings are scaled down so that sampling
/// varies (at full scale one token dominates every step).
fn tiny_model_and_data(dir: &std::path::Path, n: usize, seed: &str) -> (String, String) {
    let model = dir.join("tiny");
    let mut tiny = r3_model::tiny::TinyModel::new(r3_model::Architecture::Llama, 64, 1, 3).unwrap();
    let embeddings = tiny.weights.get_mut("model.embed_tokens.weight").unwrap();
    *embeddings = (embeddings.clone() * 0.1).unwrap();
    tiny.write_hf_dir(&model, candle_core::DType::F32).unwrap();
    let data = dir.join(format!("data-{seed}.jsonl"));
    let count = n.to_string();
    let (ok, _, err) = r3(&[
        "data",
        "arithmetic",
        "--count",
        &count,
        "--seed",
        seed,
        "--out",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    (
        model.to_str().unwrap().to_string(),
        data.to_str().unwrap().to_string(),
    )
}

/// A tiny model and `n` arithmetic records (see [`tiny_model_and_data`]),
/// a verifier passing an answer when the sum of its bytes is a multiple of
/// `modulus` (deterministic mixed rewards, so that groups train), and
/// failures mined with 2 samples per record. Returns (model, verifier
/// command, failures file).
fn mined_tiny_run(
    dir: &std::path::Path,
    n: usize,
    seed: &str,
    modulus: u32,
    max_new_tokens: &str,
) -> (String, String, String) {
    let (model, data) = tiny_model_and_data(dir, n, seed);
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    std::fs::write(
        path("verify.py"),
        format!(
            "import json, sys\nfor line in sys.stdin:\n    m = json.loads(line)\n    \
             print(json.dumps({{\"id\": m[\"id\"], \"success\": sum(m[\"answer\"].encode()) % {modulus} == 0}}), flush=True)\n"
        ),
    )
    .unwrap();
    let verifier = format!("python3 {}", path("verify.py"));
    let failures = path("failures.jsonl");
    let (ok, _, err) = r3(&[
        "mine",
        "--model",
        &model,
        "--verifier",
        &verifier,
        "--data",
        &data,
        "--samples",
        "2",
        "--max-new-tokens",
        max_new_tokens,
        "--out",
        &failures,
    ]);
    assert!(ok, "{err}");
    (model, verifier, failures)
}

fn mine_args<'a>(model: &'a str, data: &'a str, out: &'a str, samples: &'a str) -> Vec<&'a str> {
    vec![
        "mine",
        "--model",
        model,
        "--task",
        "answer",
        "--data",
        data,
        "--samples",
        samples,
        "--max-new-tokens",
        "6",
        "--batch-rows",
        "4",
        "--out",
        out,
    ]
}

/// `r3 mine` killed with SIGKILL at arbitrary moments and rerun each time
/// ends with exactly the file an uninterrupted run writes: nothing kept is
/// lost, nothing doubled. Reruns on other data or settings, a failures
/// file cut behind the state's back, or a file without a state are refused.
#[test]
fn mine_survives_kill_9_and_refuses_what_it_cannot_continue() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = tiny_model_and_data(dir.path(), 400, "5");
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (reference, out) = (path("reference.jsonl"), path("failures.jsonl"));
    let start = std::time::Instant::now();
    let (ok, _, err) = r3(&mine_args(&model, &data, &reference, "2"));
    assert!(ok, "{err}");
    let run_ms = start.elapsed().as_millis() as u64;
    let expected = std::fs::read_to_string(&reference).unwrap();
    assert!(expected.lines().count() > 50, "the tiny model fails often");

    let mut kills = 0;
    for attempt in 0..60u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_r3"))
            .args(mine_args(&model, &data, &out, "2"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Deterministic but scattered moments within one run's length.
        let moment = (attempt * 7919) % (run_ms / 4).max(1);
        std::thread::sleep(std::time::Duration::from_millis(moment));
        if child.try_wait().unwrap().is_some_and(|s| s.success()) {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        // Invariant after every kill: the state vouches only for whole lines.
        if let Ok(state) = std::fs::read_to_string(format!("{out}.state")) {
            let state: serde_json::Value = serde_json::from_str(&state).unwrap();
            let bytes = state["bytes"].as_u64().unwrap() as usize;
            let text = std::fs::read(&out).unwrap();
            assert!(text.len() >= bytes);
            assert!(
                expected.as_bytes().starts_with(&text[..bytes]),
                "kept lines changed"
            );
        }
    }
    let (ok, _, err) = r3(&mine_args(&model, &data, &out, "2"));
    assert!(ok, "{err}");
    assert!(kills >= 3, "interrupted only {kills} times");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), expected);

    let (_, other_data) = tiny_model_and_data(dir.path(), 16, "6");
    let (ok, _, err) = r3(&mine_args(&model, &other_data, &out, "2"));
    assert!(
        !ok && err.contains("data_sha256") && err.contains("data_records: 400 → 16"),
        "{err}"
    );
    let (ok, _, err) = r3(&mine_args(&model, &data, &out, "3"));
    assert!(!ok && err.contains("samples: 2 → 3"), "{err}");
    std::fs::write(&out, "").unwrap();
    let (ok, _, err) = r3(&mine_args(&model, &data, &out, "2"));
    assert!(!ok && err.contains("cut outside r3 mine"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "",
        "nothing rewritten"
    );
    let stray = path("stray.jsonl");
    std::fs::write(&stray, "{}\n").unwrap();
    let (ok, _, err) = r3(&mine_args(&model, &data, &stray, "2"));
    assert!(!ok && err.contains("is not a mining run"), "{err}");
    assert_eq!(std::fs::read_to_string(&stray).unwrap(), "{}\n");
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
}

/// The metrics of a line, without its timings.
fn comparable_metrics(line: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    v.as_object_mut()
        .unwrap()
        .retain(|k, _| !k.starts_with("seconds_") && k != "tokens_per_s");
    v
}

/// `r3 train` on a tiny model, killed with SIGKILL at scattered moments
/// and rerun with `--resume auto` each time, ends with the weights and
/// metrics of an uninterrupted run; every checkpoint left behind loads.
#[test]
fn train_survives_kill_9_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (model, verifier, failures) = mined_tiny_run(dir.path(), 24, "2", 3, "6");
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let train_args = |out: &str| -> Vec<String> {
        [
            format!("model={model}"),
            format!("verifier={verifier}"),
            format!("failures={failures}"),
            format!("output_dir={out}"),
            "max_steps=6".into(),
            "save_steps=1".into(),
            "failures_per_step=2".into(),
            "num_generations=4".into(),
            "max_completion_length=4".into(),
            "retry_max_tokens=4".into(),
            "learning_rate=0.001".into(),
            "beta=0.01".into(),
        ]
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .chain(["--resume".to_string(), "auto".to_string()])
        .collect()
    };
    let run = |out: &str| -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_r3"));
        c.arg("train").args(train_args(out));
        c
    };
    let whole = path("whole");
    let start = std::time::Instant::now();
    let out = run(&whole).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run_ms = start.elapsed().as_millis() as u64;

    let parts = path("parts");
    let mut kills = 0;
    for attempt in 0..60u64 {
        let mut child = run(&parts)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(
            (attempt * 7919) % (run_ms / 3).max(1),
        ));
        if child.try_wait().unwrap().is_some_and(|s| s.success()) {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        for entry in std::fs::read_dir(&parts).into_iter().flatten() {
            let p = entry.unwrap().path();
            if p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("checkpoint-")
            {
                r3_model::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
        }
    }
    let out = run(&parts).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(kills >= 3, "interrupted only {kills} times");

    let metrics = |dir: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(format!("{dir}/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(comparable_metrics)
            .collect()
    };
    let expected = metrics(&whole);
    assert_eq!(expected.len(), 6);
    assert_eq!(metrics(&parts), expected, "resumed metrics differ");
    assert!(
        expected
            .iter()
            .any(|m| m["grad_norm"].as_f64().unwrap() > 0.0),
        "the run should have trained"
    );
    let a = r3_model::load(std::path::Path::new(&format!("{whole}/checkpoint-6"))).unwrap();
    let b = r3_model::load(std::path::Path::new(&format!("{parts}/checkpoint-6"))).unwrap();
    for name in a.weights.names() {
        let dims = a.weights.dims(name).unwrap();
        let (x, y) = (
            a.weights.get(name, dims).unwrap(),
            b.weights.get(name, dims).unwrap(),
        );
        let same = x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(same, "{name}: final weights differ");
    }
}

/// LoRA from the command line: `r3 train --use-peft` writes a PEFT adapter
/// directory, which `--model` loads on its base; `r3 merge` folds it into
/// an HF directory with the same logits; misuse is named.
#[test]
fn lora_adapters_train_load_and_merge() {
    let dir = tempfile::tempdir().unwrap();
    let (model, verifier, failures) = mined_tiny_run(dir.path(), 8, "3", 2, "4");
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let sets = [
        format!("model={model}"),
        format!("verifier={verifier}"),
        format!("failures={failures}"),
        format!("output_dir={}", path("run")),
        "max_steps=2".into(),
        "failures_per_step=2".into(),
        "num_generations=4".into(),
        "max_completion_length=4".into(),
        "retry_max_tokens=4".into(),
        "learning_rate=0.05".into(),
    ];
    let mut args = vec![
        "train".to_string(),
        "--use-peft".into(),
        "--lora-r".into(),
        "4".into(),
        "--lora-target-modules".into(),
        "q_proj,v_proj".into(),
    ];
    args.extend(sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = r3(&args);
    assert!(ok, "{err}");
    let checkpoint = path("run/checkpoint-2");
    let config = std::fs::read_to_string(format!("{checkpoint}/adapter_config.json")).unwrap();
    assert!(
        config.contains("\"q_proj\"") && config.contains(&model),
        "{config}"
    );

    std::fs::write(
        path("m.json"),
        r#"[{"role": "user", "content": "What is 1 + 2?"}]"#,
    )
    .unwrap();
    let logits = |model_args: &[&str]| -> Vec<f64> {
        let mut args = vec!["logits", "--messages"];
        let messages = path("m.json");
        args.push(&messages);
        args.extend(model_args);
        let (ok, out, err) = r3(&args);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["last_top_k"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[1].as_f64().unwrap())
            .collect()
    };
    let adapted = logits(&["--model", &checkpoint]);
    assert_eq!(
        adapted,
        logits(&["--model", &model, "--adapter", &checkpoint])
    );
    let (ok, _, err) = r3(&["merge", "--model", &checkpoint, "--out", &path("merged")]);
    assert!(ok, "{err}");
    let merged = logits(&["--model", &path("merged")]);
    for (a, m) in adapted.iter().zip(&merged) {
        assert!((a - m).abs() <= 1e-4, "{adapted:?} vs {merged:?}");
    }
    // Misuse is named.
    let (ok, _, err) = r3(&["merge", "--model", &model, "--out", &path("merged2")]);
    assert!(!ok && err.contains("nothing to merge"), "{err}");
    let (ok, _, err) = r3(&[
        "logits",
        "--messages",
        &path("m.json"),
        "--model",
        &model,
        "--adapter",
        &path("run"),
    ]);
    assert!(!ok && err.contains("adapter_config.json"), "{err}");
    let (ok, _, err) = r3(&[
        "train",
        "--use-peft",
        "--lora-target-modules",
        "qkv",
        "--set",
        &sets[2],
    ]);
    assert!(
        !ok && err.contains("unknown LoRA target module 'qkv'"),
        "{err}"
    );
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
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["model"], config, "{v}");
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
