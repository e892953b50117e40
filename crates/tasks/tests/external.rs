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
    print(json.dumps({"id": msg["id"], "success": ok, "reason": "match" if ok else "expected " + msg["record"]["answer"]}), flush=True)
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

fn verifier_in(
    dir: &std::path::Path,
    name: &str,
    script: &str,
    timeout_ms: u64,
) -> ExternalVerifier {
    let path = dir.join(name);
    std::fs::write(&path, script).unwrap();
    ExternalVerifier::new(
        &format!("python3 {}", path.display()),
        Duration::from_millis(timeout_ms),
    )
}

/// A verifier that never reads its stdin, sent a request larger than a
/// pipe holds: the write must not block r3 past the timeout.
#[test]
fn a_verifier_that_never_reads_times_out_even_on_a_huge_request() {
    let v = ExternalVerifier::new("sleep 30", Duration::from_millis(800));
    let start = Instant::now();
    let huge = "x".repeat(1 << 20);
    let verdict = v.verify(&json!({"prompt": "p"}), &huge);
    assert!(
        !verdict.success && verdict.reason.contains("timed out"),
        "{}",
        verdict.reason
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

/// Extra lines never shift verdicts onto other requests: a verifier that
/// answers twice, or prints a late stale reply, is matched by the ids it
/// echoes, so the extra lines are skipped.
#[test]
fn extra_reply_lines_never_credit_another_request() {
    let dir = tempfile::tempdir().unwrap();
    let twice = verifier_in(
        dir.path(),
        "twice.py",
        r#"
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    ok = msg["answer"] == msg["record"]["answer"]
    print(json.dumps({"id": msg["id"], "success": ok}), flush=True)
    print(json.dumps({"id": msg["id"], "success": ok}), flush=True)
"#,
        2000,
    );
    let stale = verifier_in(
        dir.path(),
        "stale.py",
        r#"
import json, sys
last = None
for line in sys.stdin:
    msg = json.loads(line)
    if last is not None:
        print(json.dumps(last), flush=True)
    ok = msg["answer"] == msg["record"]["answer"]
    last = {"id": msg["id"], "success": ok}
    print(json.dumps(last), flush=True)
"#,
        2000,
    );
    let record = json!({"prompt": "p", "answer": "42"});
    for v in [&twice, &stale] {
        for (answer, right) in [
            ("42", true),
            ("1", false),
            ("2", false),
            ("42", true),
            ("3", false),
        ] {
            assert_eq!(v.verify(&record, answer).success, right, "answer {answer}");
        }
        assert!(v.broken().is_none());
    }
}

/// The race the issue found: a verifier that does not echo ids, always
/// says false and prints a late stray `true` line. Without ids no reply
/// can be matched to its request, so the first reply without one breaks
/// the task with the one-line fix, and no verdict is ever a success.
#[test]
fn replies_without_an_id_are_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let stray = verifier_in(
        dir.path(),
        "stray.py",
        r#"
import json, sys, threading, time
def late():
    time.sleep(0.05)
    print(json.dumps({"success": True}), flush=True)
for line in sys.stdin:
    print(json.dumps({"success": False}), flush=True)
    threading.Thread(target=late).start()
"#,
        2000,
    );
    let record = json!({"prompt": "p", "answer": "42"});
    assert!(stray.broken().is_none(), "nothing asked yet");
    for _ in 0..20 {
        let verdict = stray.verify(&record, "42");
        assert!(!verdict.success, "{}", verdict.reason);
        assert!(verdict.reason.contains("\"id\""), "{}", verdict.reason);
    }
    let why = stray
        .broken()
        .expect("a reply without an id breaks the task");
    assert!(why.contains("msg[\"id\"]"), "{why}");
}

/// On a timeout the verifier's whole process group dies, grandchildren too.
#[test]
fn a_timed_out_verifier_takes_its_children_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("grandchild.pid");
    let command = format!(
        "sh -c 'sleep 300 & echo $! > {}; sleep 300'",
        pid_file.display()
    );
    let v = ExternalVerifier::new(&command, Duration::from_millis(800));
    let verdict = v.verify(&json!({"prompt": "p"}), "x");
    assert!(verdict.reason.contains("timed out"), "{}", verdict.reason);
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
            .unwrap_or(false)
    };
    let start = Instant::now();
    while alive() && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(), "grandchild {pid} survived its verifier");
}

/// An endless line fails with its reason instead of filling memory; so
/// does a reply that is not UTF-8.
#[test]
fn endless_and_non_utf8_replies_fail_with_their_reason() {
    let endless = ExternalVerifier::new("cat /dev/zero", Duration::from_secs(10));
    let verdict = endless.verify(&json!({"prompt": "p"}), "x");
    assert!(
        !verdict.success && verdict.reason.contains("over 1048576 bytes"),
        "{}",
        verdict.reason
    );
    let binary = ExternalVerifier::new(
        r#"sh -c 'read x; printf "\377\376\n"; sleep 5'"#,
        Duration::from_secs(4),
    );
    let verdict = binary.verify(&json!({"prompt": "p"}), "x");
    assert!(
        !verdict.success && verdict.reason.contains("not UTF-8"),
        "{}",
        verdict.reason
    );
}
