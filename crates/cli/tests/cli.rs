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
