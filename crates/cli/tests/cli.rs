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
}
