//! Any verifier, in any language: an external process started once that
//! answers JSON lines on stdin/stdout,
//! `{"record": {...}, "answer": "..."}` → `{"success": bool, "reason": "..."}`.
//! A verifier that crashes, hangs or prints garbage yields a failed verdict
//! saying so, is restarted, and the run goes on.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{Task, Verdict};

/// A running verifier process and the lines it prints.
struct Process {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Process {
    fn spawn(command: &str) -> std::io::Result<Self> {
        // `exec` makes the verifier itself the child, so a kill reaches it.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {command}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            lines,
        })
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A task whose verdicts come from an external command. Records need a
/// `prompt`; everything else in them is passed to the verifier untouched.
pub struct ExternalVerifier {
    command: String,
    timeout: Duration,
    process: Mutex<Option<Process>>,
}

impl ExternalVerifier {
    pub fn new(command: &str, timeout: Duration) -> Self {
        Self {
            command: command.to_string(),
            timeout,
            process: Mutex::new(None),
        }
    }

    fn ask(&self, record: &Value, answer: &str) -> Verdict {
        let mut slot = self.process.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            match Process::spawn(&self.command) {
                Ok(p) => *slot = Some(p),
                Err(e) => {
                    return Verdict::fail(format!("cannot start verifier '{}': {e}", self.command))
                }
            }
        }
        let process = slot.as_mut().expect("spawned above");
        let request = json!({"record": record, "answer": answer}).to_string();
        if let Err(e) = writeln!(process.stdin, "{request}").and_then(|_| process.stdin.flush()) {
            let status = slot.take().map(exit_status).unwrap_or_default();
            return Verdict::fail(format!("verifier crashed ({e}{status}); restarted"));
        }
        match process.lines.recv_timeout(self.timeout) {
            Ok(line) => match parse_reply(&line) {
                Ok(verdict) => verdict,
                Err(why) => {
                    if let Some(p) = slot.take() {
                        p.kill();
                    }
                    Verdict::fail(format!("verifier printed garbage ({why}); restarted"))
                }
            },
            Err(RecvTimeoutError::Timeout) => {
                if let Some(p) = slot.take() {
                    p.kill();
                }
                Verdict::fail(format!(
                    "verifier timed out after {:.1}s; restarted",
                    self.timeout.as_secs_f64()
                ))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = slot.take().map(exit_status).unwrap_or_default();
                Verdict::fail(format!("verifier exited{status}; restarted"))
            }
        }
    }
}

fn exit_status(mut p: Process) -> String {
    let _ = p.child.kill();
    match p.child.wait() {
        Ok(status) => format!(" with {status}"),
        Err(_) => String::new(),
    }
}

fn parse_reply(line: &str) -> Result<Verdict, String> {
    let shown: String = line.chars().take(80).collect();
    let v: Value = serde_json::from_str(line).map_err(|_| format!("not JSON: '{shown}'"))?;
    let success = v
        .get("success")
        .and_then(Value::as_bool)
        .ok_or_else(|| format!("no boolean 'success' in '{shown}'"))?;
    let reason = v
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or(if success { "correct" } else { "incorrect" });
    Ok(Verdict {
        success,
        reason: reason.to_string(),
    })
}

impl Drop for ExternalVerifier {
    fn drop(&mut self) {
        if let Some(p) = self
            .process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            p.kill();
        }
    }
}

impl Task for ExternalVerifier {
    fn name(&self) -> &'static str {
        "external"
    }

    fn check_record(&self, record: &Value) -> Result<(), String> {
        crate::records::prompt_field(record).map(|_| ())
    }

    fn user_prompt(&self, record: &Value) -> String {
        crate::records::prompt_field(record)
            .unwrap_or_default()
            .to_string()
    }

    fn verify(&self, record: &Value, answer: &str) -> Verdict {
        self.ask(record, answer)
    }
}
