//! The attacks of the second hostile-user review, kept as tests: paths r3
//! did not create, flags and config values that ran unchecked, shapes and
//! ranks that aborted on allocation, a device check with nothing to check,
//! a reader that closed the output early.

mod common;

use common::{init_tiny, r3, tiny_model_and_data, QUICK_BENCH_KERNELS};

/// `r3 init --out d/project.new` removed a user's `d/project.tmp`.
#[test]
fn no_command_removes_a_path_it_did_not_create() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("project.tmp");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("thesis.txt"), "years of work").unwrap();
    let (ok, _, err) = init_tiny(&dir.path().join("project.new"), &[]);
    assert!(ok, "{err}");
    assert!(theirs.join("thesis.txt").exists());
    assert!(dir.path().join("project.new/config.json").exists());
    // Nothing of r3's own is left behind either.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn data_refuses_an_existing_out_unless_told_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mine.jsonl");
    std::fs::write(&out, "my own records\n").unwrap();
    let out = out.to_str().unwrap();
    for task in ["arithmetic", "countdown"] {
        let (ok, _, err) = r3(&["data", task, "--count", "3", "--out", out]);
        assert!(
            !ok && err.contains("exists") && err.contains("--overwrite"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(out).unwrap(), "my own records\n");
    }
    let (ok, _, err) = r3(&[
        "data",
        "arithmetic",
        "--count",
        "3",
        "--out",
        out,
        "--overwrite",
    ]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(out).unwrap().lines().count(), 3);
}

/// Checked before any model loads, so a missing model is never reached.
#[test]
fn generate_checks_its_sampling_flags() {
    for (flag, value, says) in [
        ("--temperature", "NaN", "--temperature"),
        ("--temperature", "inf", "--temperature"),
        ("--temperature", "-1", "--temperature"),
        ("--top-p", "0", "--top-p"),
        ("--top-p", "-5", "--top-p"),
        ("--top-p", "NaN", "--top-p"),
        ("--max-new-tokens", "0", "--max-new-tokens"),
    ] {
        let flag_value = format!("{flag}={value}");
        let (ok, _, err) = r3(&[
            "generate",
            "--model",
            "/nonexistent/model.gguf",
            "--prompt",
            "hi",
            &flag_value,
        ]);
        assert!(
            !ok && err.contains(says) && !err.contains("nonexistent"),
            "{flag_value}: {err}"
        );
    }
}

/// `limit = false` evaluated every record; a type error did not name the
/// file. Each key is now judged as its flag would be, naming the file.
#[test]
fn config_files_mean_what_they_say() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("eval.toml");
    let run = |text: &str| {
        std::fs::write(&config, text).unwrap();
        r3(&[
            "eval",
            "--config",
            config.to_str().unwrap(),
            "--task",
            "answer",
            "--data",
            "/nonexistent/data.jsonl",
        ])
    };
    for (text, says) in [
        ("limit = false", "'limit' takes a value"),
        ("limit = \"many\"", "'limit' = \"many\""),
        ("temperature = [1]", "'temperature' takes a value"),
        ("skip_invalid = 1", "'skip_invalid' is a switch"),
    ] {
        let (ok, _, err) = run(text);
        assert!(
            !ok && err.contains("eval.toml") && err.contains(says),
            "{text}: {err}"
        );
    }
    // A switch set to false is off, and the run goes on to the next error.
    let (ok, _, err) = run("skip_invalid = false");
    assert!(!ok && err.contains("/nonexistent/data.jsonl"), "{err}");
}

/// `--set` errors named the TOML file instead of the override.
#[test]
fn set_errors_name_the_override() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("train.toml");
    // `r3 train --config train.toml` with `args` after it.
    let train = |args: &[&str]| {
        let mut all = vec!["train", "--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        r3(&all)
    };
    std::fs::write(&config, "max_steps = 2\n").unwrap();
    let (ok, _, err) = train(&["--set", "failures=x.jsonl", "--set", "lora_r=many"]);
    assert!(!ok && err.contains("--set lora_r=many"), "{err}");
    std::fs::write(&config, "max_steps = \"two\"\n").unwrap();
    let (ok, _, err) = train(&["--set", "lora_r=4"]);
    assert!(
        !ok && err.contains("train.toml") && !err.contains("--set"),
        "{err}"
    );
    // An unknown key names the file and the key.
    std::fs::write(&config, "max_stepz = 2\n").unwrap();
    let (ok, _, err) = train(&[]);
    assert!(
        !ok && err.contains("train.toml") && err.contains("max_stepz"),
        "{err}"
    );
    // The command line wins over the file: --use-peft over use_peft = false
    // (the huge rank is refused only for LoRA).
    std::fs::write(&config, "use_peft = false\nfailures = \"x.jsonl\"\n").unwrap();
    let (ok, _, err) = train(&["--use-peft", "--set", "lora_r=1000000000"]);
    assert!(!ok && err.contains("lora_r 1000000000 is over"), "{err}");
}

/// A 206 GB random init and a rank of a billion aborted on allocation.
#[test]
fn sizes_are_bounded_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let shape = dir.path().join("huge.json");
    let huge = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 49152, "hidden_size": 16384, "intermediate_size": 65536,
        "num_hidden_layers": 48, "num_attention_heads": 128, "num_key_value_heads": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    });
    std::fs::write(&shape, huge.to_string()).unwrap();
    let (ok, _, err) = r3(&[
        "init",
        "--shape",
        shape.to_str().unwrap(),
        "--out",
        dir.path().join("m").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("GB available"), "{err}");
    let (ok, _, err) = r3(&[
        "train",
        "--use-peft",
        "--set",
        "failures=x.jsonl",
        "--set",
        "lora_r=1000000000",
    ]);
    assert!(!ok && err.contains("lora_r 1000000000 is over"), "{err}");
}

/// On a build without CUDA, the default device is the CPU: there is
/// nothing to compare it with, and a minute of CPU against CPU said "ok".
#[test]
fn device_check_without_a_gpu_says_there_is_nothing_to_compare() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tiny_model_and_data(dir.path(), 1, "1");
    let (ok, out, err) = r3(&["device-check", "--model", &model]);
    if cfg!(feature = "cuda") && ok {
        return; // a GPU answered: the comparison ran, as it should
    }
    assert!(
        !ok && err.contains("nothing to compare") && out.is_empty(),
        "{err}"
    );
}

/// Two miners on one output interleaved their lines; the second is now
/// refused while the first holds the file.
#[test]
fn a_mining_output_has_one_writer() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = tiny_model_and_data(dir.path(), 2, "4");
    let out = dir.path().join("failures.jsonl");
    let held = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out)
        .unwrap();
    held.lock().unwrap();
    let args = [
        "mine",
        "--model",
        &model,
        "--task",
        "answer",
        "--data",
        &data,
        "--samples",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        out.to_str().unwrap(),
    ];
    let (ok, _, err) = r3(&args);
    assert!(
        !ok && err.contains("being written by another r3 mine"),
        "{err}"
    );
    held.unlock().unwrap();
    let (ok, _, err) = r3(&args);
    assert!(ok, "{err}");
}

/// The demo rewrites its own files; a user's directory given as its --out
/// is refused before anything is written.
#[test]
fn the_demo_writes_only_into_its_own_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    let (ok, _, err) = r3(&[
        "demo",
        "--out",
        dir.path().to_str().unwrap(),
        "--steps",
        "1",
    ]);
    assert!(!ok && err.contains("did not write"), "{err}");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

/// `r3 bench … | head` panicked ("failed printing to stdout: Broken pipe")
/// when the reader had gone before the report was written. A reader that
/// stops early asked for no more: the command ends quietly, with success.
#[test]
fn a_reader_that_stops_early_is_not_a_crash() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_r3"))
        .args(QUICK_BENCH_KERNELS)
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
