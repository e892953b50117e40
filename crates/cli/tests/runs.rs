//! Runs that must survive: mining, evaluation and training killed with
//! SIGKILL and resumed, and LoRA adapters trained, loaded and merged from the command
//! line.

mod common;

use std::process::Command;

use common::{mined_tiny_run, r3, r3_in, tiny_model_and_data};

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

/// Runs `r3 args` up to 60 times, each killed with SIGKILL at a
/// deterministic but scattered moment within the first quarter of
/// `run_ms` (one uninterrupted run's length), calling `after_kill` after
/// each kill; stops early when a run finishes. Returns the kills.
fn kill_repeatedly(args: &[&str], run_ms: u64, mut after_kill: impl FnMut()) -> usize {
    let mut kills = 0;
    for attempt in 0..60u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_r3"))
            .args(args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let moment = (attempt * 7919) % (run_ms / 4).max(1);
        std::thread::sleep(std::time::Duration::from_millis(moment));
        if child.try_wait().unwrap().is_some_and(|s| s.success()) {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        after_kill();
    }
    kills
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

    // Invariant after every kill: the state vouches only for whole lines.
    let kills = kill_repeatedly(&mine_args(&model, &data, &out, "2"), run_ms, || {
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
    });
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

fn eval_args<'a>(model: &'a str, data: &'a str, out: &'a str, tokens: &'a str) -> Vec<&'a str> {
    vec![
        "eval",
        "--model",
        model,
        "--task",
        "answer",
        "--data",
        data,
        "--max-new-tokens",
        tokens,
        "--reflection-max-tokens",
        "6",
        // Sampled (hot: the tiny model is sure of itself), so that a
        // resumed chunk must continue the streams, not restart them.
        "--temperature",
        "20",
        "--batch-rows",
        "2",
        "--out",
        out,
    ]
}

/// `r3 eval` killed with SIGKILL at arbitrary moments and rerun each time
/// ends with exactly the summary and transcripts an uninterrupted run
/// writes, and leaves no unfinished chunks behind; while chunks are kept,
/// a rerun with other settings is refused, naming what changed.
#[test]
fn eval_survives_kill_9_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = tiny_model_and_data(dir.path(), 320, "7");
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (reference, out) = (path("reference"), path("eval"));
    let start = std::time::Instant::now();
    let (ok, _, err) = r3(&eval_args(&model, &data, &reference, "8"));
    assert!(ok, "{err}");
    let run_ms = start.elapsed().as_millis() as u64;
    let read = |dir: &str, file: &str| {
        std::fs::read_to_string(std::path::Path::new(dir).join(file)).unwrap()
    };
    let expected = read(&reference, "transcripts.jsonl");
    assert_eq!(expected.lines().count(), 320);
    assert!(expected.contains("\"reflection\":\""), "some attempts fail");

    let partial = std::path::Path::new(&out).join("partial");
    let mut refused = false;
    let kills = kill_repeatedly(&eval_args(&model, &data, &out, "8"), run_ms, || {
        if !refused && partial.join("00000000.jsonl").exists() {
            let (ok, _, err) = r3(&eval_args(&model, &data, &out, "9"));
            assert!(
                !ok && err.contains("unfinished evaluation") && err.contains("max_new_tokens"),
                "{err}"
            );
            refused = true;
        }
    });
    // The last child may have finished the run itself; a rerun then would
    // evaluate everything again, straight, and prove nothing.
    if partial.exists() {
        let (ok, _, err) = r3(&eval_args(&model, &data, &out, "8"));
        assert!(ok, "{err}");
    }
    // (Not assert_eq: 320 transcripts would bury the message.)
    assert!(
        read(&out, "transcripts.jsonl") == expected,
        "the resumed transcripts differ from an uninterrupted run's"
    );
    assert_eq!(read(&out, "summary.json"), read(&reference, "summary.json"));
    assert!(
        kills >= 3 && refused,
        "interrupted {kills} times, refused: {refused}"
    );
    assert!(!partial.exists(), "the finished chunks are removed");
}

/// The metrics of a line, without its timings.
fn comparable_metrics(line: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    v.as_object_mut()
        .unwrap()
        .retain(|k, _| !k.starts_with("seconds_") && k != "tokens_per_s");
    v
}

/// `r3 train` on a tiny model, made to die as kill -9 would at every named
/// point of every step (`R3_CRASH_AT`: after a step's log line, with a
/// checkpoint written but not renamed, renamed but not pointed to) and
/// once by a real SIGKILL, rerun with `--resume auto` each time, ends with
/// the weights and metrics of an uninterrupted run; every checkpoint left
/// behind loads.
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

    // Deterministic kill points: the run aborts (no cleanup, as kill -9)
    // at each named point of each step, and `--resume auto` continues.
    let parts = path("parts");
    let mut kills = 0;
    for step in 1..=5 {
        for point in r3_train::crash::CrashPoint::ALL {
            let out = run(&parts)
                .env("R3_CRASH_AT", format!("{}:{step}", point.name()))
                .output()
                .unwrap();
            assert!(
                !out.status.success(),
                "{}:{step} did not stop the run",
                point.name()
            );
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
    }
    // And once at a moment no code chose: SIGKILL mid-run.
    let mut child = run(&parts)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(run_ms / 12));
    let _ = child.kill();
    child.wait().unwrap();
    let out = run(&parts).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(kills, 15);

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
    // A full checkpoint's config.json names what it came from, as
    // transformers' `_name_or_path` does.
    let config = std::fs::read_to_string(format!("{whole}/checkpoint-6/config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let base = std::fs::canonicalize(&model).unwrap();
    assert_eq!(config["_name_or_path"], base.display().to_string());
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
    // The model by a relative path: the checkpoint must name it absolutely.
    assert!(model.ends_with("/tiny"));
    let sets = [
        "model=tiny".to_string(),
        format!("verifier={verifier}"),
        format!("failures={failures}"),
        format!("output_dir={}", path("run")),
        "max_steps=2".into(),
        "failures_per_step=2".into(),
        "num_generations=4".into(),
        "max_completion_length=4".into(),
        "retry_max_tokens=4".into(),
        "learning_rate=0.05".into(),
        "report_to=tensorboard".into(),
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
    let (ok, _, err) = r3_in(dir.path(), &args);
    assert!(ok, "{err}");
    let checkpoint = path("run/checkpoint-2");
    // Live curves: one TensorBoard event file, written during the run.
    let events: Vec<_> = std::fs::read_dir(path("run/runs")).unwrap().collect();
    assert_eq!(events.len(), 1);
    let config = std::fs::read_to_string(format!("{checkpoint}/adapter_config.json")).unwrap();
    let absolute = std::fs::canonicalize(&model).unwrap();
    assert!(
        config.contains("\"q_proj\"") && config.contains(&format!("\"{}\"", absolute.display())),
        "{config}"
    );
    // The same run resumed as full fine-tuning is refused by its setting.
    let mut full: Vec<&str> = vec!["train", "--resume", "auto"];
    full.extend(sets.iter().flat_map(|s| ["--set", s.as_str()]));
    full.extend(["--set", "max_steps=3"]);
    let (ok, _, err) = r3_in(dir.path(), &full);
    assert!(!ok && err.contains("use_peft: true → false"), "{err}");

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
    // A user's `merged.tmp` beside the output is not r3's to remove.
    std::fs::create_dir_all(path("merged.tmp")).unwrap();
    std::fs::write(path("merged.tmp/thesis.txt"), "years of work").unwrap();
    let (ok, _, err) = r3(&["merge", "--model", &checkpoint, "--out", &path("merged")]);
    assert!(ok, "{err}");
    assert!(std::path::Path::new(&path("merged.tmp/thesis.txt")).exists());
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

/// `r3 eval --config FILE` reads its settings from TOML keyed by flag
/// name; a flag on the command line wins over the file; an unknown key
/// names the file and lists the valid ones.
#[test]
fn eval_reads_a_config_file_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = common::tiny_model_and_data(dir.path(), 6, "11");
    let out = dir.path().join("eval");
    let config = dir.path().join("eval.toml");
    let text = format!(
        "model = {model:?}\ntask = \"answer\"\ndata = {data:?}\nlimit = 5\n\
         max_new_tokens = 4\nreflection_max_tokens = 4\nbatch_rows = 8\n\
         skip_invalid = true\nout = {:?}\n",
        out.to_str().unwrap()
    );
    std::fs::write(&config, text).unwrap();
    let config = config.to_str().unwrap();
    let summary = |path: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path.join("summary.json")).unwrap()).unwrap()
    };
    let (ok, _, err) = r3(&["eval", "--config", config]);
    assert!(ok, "{err}");
    assert_eq!(summary(&out)["n"], 5);
    let (ok, _, err) = r3(&["eval", "--config", config, "--limit", "2"]);
    assert!(ok, "{err}");
    assert_eq!(summary(&out)["n"], 2);

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "sampels = 3\n").unwrap();
    let (ok, _, err) = r3(&["mine", "--config", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("bad.toml: unknown key 'sampels'"), "{err}");
    assert!(err.contains("samples"), "{err}");
}
