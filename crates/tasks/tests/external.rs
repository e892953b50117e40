//! The external verifier protocol, including verifiers that crash, hang or
//! print garbage.

use std::time::{Duration, Instant};

use r3_tasks::external::ExternalVerifier;
use r3_tasks::Task;
use serde_json::json;

/// A verifier in Python: correct when the answer equals the record's
/// `answer`; "crash", "hang" and "garbage" answers misbehave on purpose.
const SCRIPT: &str = r#"
import json, sys, time
for line in sys.stdin:
    msg = json.loads(line)
    answer = msg["answer"]
    if answer == "crash":
        sys.exit(3)
    if answer == "hang":
        time.sleep(60)
    if answer == "garbage":
        print("this is not json", flush=True)
        continue
    ok = answer == msg["record"]["answer"]
    print(json.dumps({"success": ok, "reason": "match" if ok else "expected " + msg["record"]["answer"]}), flush=True)
"#;

#[test]
fn misbehaving_verifiers_fail_the_call_and_are_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("verify.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let v = ExternalVerifier::new(
        &format!("python3 {}", script.display()),
        Duration::from_millis(1500),
    );
    let record = json!({"prompt": "p", "answer": "42"});
    assert!(v.check_record(&record).is_ok());
    assert!(v.verify(&record, "42").success);
    let wrong = v.verify(&record, "41");
    assert!(!wrong.success && wrong.reason == "expected 42");

    let crash = v.verify(&record, "crash");
    assert!(
        !crash.success && crash.reason.contains("exited"),
        "{}",
        crash.reason
    );
    assert!(v.verify(&record, "42").success, "restarted after a crash");

    let start = Instant::now();
    let hang = v.verify(&record, "hang");
    assert!(
        !hang.success && hang.reason.contains("timed out"),
        "{}",
        hang.reason
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(v.verify(&record, "42").success, "restarted after a hang");

    let garbage = v.verify(&record, "garbage");
    assert!(
        !garbage.success && garbage.reason.contains("garbage"),
        "{}",
        garbage.reason
    );
    assert!(v.verify(&record, "42").success, "restarted after garbage");
}

#[test]
fn a_verifier_that_cannot_start_fails_every_call_with_the_reason() {
    let v = ExternalVerifier::new("/nonexistent/verifier --flag", Duration::from_secs(2));
    let verdict = v.verify(&json!({"prompt": "p"}), "x");
    assert!(!verdict.success);
    assert!(
        verdict.reason.contains("exited") || verdict.reason.contains("crashed"),
        "{}",
        verdict.reason
    );
}
