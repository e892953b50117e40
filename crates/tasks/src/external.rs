//! Any verifier, in any language: an external process started once that
//! answers JSON lines on stdin/stdout,
//! `{"id": 7, "record": {...}, "answer": "..."}` →
//! `{"id": 7, "success": bool, "reason": "..."}`.
//!
//! A verdict is never credited to the wrong request: every reply must echo
//! its request's `id` and is matched by it (a stale one is skipped). A
//! reply without one could belong to any request (a late stray line races
//! the next request), so it is refused, and the run stops with the one-line
//! fix ([`Task::broken`]). A verifier that crashes, hangs (also
//! while being written to), prints garbage, an over-long or a non-UTF-8
//! line yields a failed verdict saying so, is killed with everything it
//! started, and is restarted; the run goes on.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{Task, Verdict};

/// The longest reply line read; past it the reply fails (`cat /dev/zero`
/// must not grow r3 without bound).
pub const MAX_REPLY_BYTES: usize = 1 << 20;

/// One line of the verifier's stdout, or why it could not be read.
type Line = Result<String, String>;

/// A running verifier process, the thread writing its requests and the
/// lines it prints.
struct Process {
    child: Child,
    requests: Sender<String>,
    lines: Receiver<Line>,
    next_id: u64,
}

impl Process {
    fn spawn(command: &str) -> std::io::Result<Self> {
        // `exec` makes the verifier itself the child; its own process group
        // lets a kill reach whatever it starts.
        let mut command_line = Command::new("sh");
        command_line
            .arg("-c")
            .arg(format!("exec {command}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command_line, 0);
        let mut child = command_line.spawn()?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (line_tx, lines) = mpsc::channel();
        std::thread::spawn(move || read_lines(stdout, line_tx));
        // Writes happen on their own thread: a verifier that never reads
        // would otherwise block r3 once the pipe's buffer is full, beyond
        // the reach of any timeout.
        let (requests, request_rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for request in request_rx {
                if writeln!(stdin, "{request}")
                    .and_then(|_| stdin.flush())
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            requests,
            lines,
            next_id: 0,
        })
    }

    /// Kills the verifier and every process in its group; returns how it
    /// ended, for the verdict's reason. The group is signalled before the
    /// leader is reaped: until then its pid, and so the group's id, cannot
    /// be handed to another process.
    fn kill(mut self) -> String {
        // A verifier on its way out gets a moment, so that its own exit
        // status (not our signal) is what the reason reports.
        std::thread::sleep(Duration::from_millis(20));
        #[cfg(unix)]
        // SAFETY: kill(2) with a negative pid signals the process group
        // the verifier leads; it touches no memory.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => format!(" with {status}"),
            Err(_) => String::new(),
        }
    }
}

/// Sends each line of `stdout` (at most [`MAX_REPLY_BYTES`], UTF-8) to
/// `tx`, or the reason it could not, then stops.
fn read_lines(stdout: ChildStdout, tx: Sender<Line>) {
    let mut reader = BufReader::new(stdout);
    loop {
        let mut line = Vec::new();
        let limit = MAX_REPLY_BYTES as u64 + 1;
        match (&mut reader).take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let message = if line.last() == Some(&b'\n') {
            line.pop();
            String::from_utf8(line).map_err(|_| "a reply that is not UTF-8".to_string())
        } else if line.len() > MAX_REPLY_BYTES {
            Err(format!("a reply line over {MAX_REPLY_BYTES} bytes"))
        } else {
            // The last line, cut by the end of the stream.
            String::from_utf8(line).map_err(|_| "a reply that is not UTF-8".to_string())
        };
        let failed = message.is_err();
        if tx.send(message).is_err() || failed {
            return;
        }
    }
}

/// The longest a verifier may take per answer: a day. Longer is a typo,
/// and would overflow a `Duration` long before `f64` does.
pub const MAX_TIMEOUT_SECONDS: f64 = 86_400.0;

/// A verifier timeout in seconds as a `Duration`, or why it is not one
/// (negative, zero, NaN, infinite or over a day).
pub fn timeout_from_seconds(seconds: f64) -> Result<Duration, String> {
    if seconds > 0.0 && seconds <= MAX_TIMEOUT_SECONDS {
        Ok(Duration::from_secs_f64(seconds))
    } else {
        Err(format!(
            "a verifier timeout must be a number of seconds in (0, {MAX_TIMEOUT_SECONDS}], not {seconds}"
        ))
    }
}

/// A task whose verdicts come from an external command. Records need a
/// `prompt`; everything else in them is passed to the verifier untouched.
pub struct ExternalVerifier {
    command: String,
    timeout: Duration,
    process: Mutex<Option<Process>>,
    /// Set once a reply broke the protocol in a way no restart mends.
    broken: std::sync::OnceLock<String>,
}

/// What a reply without an `id` is told, with the one-line fix.
pub const MISSING_ID: &str = "the verifier replied without the request's \"id\", so its verdict cannot be matched to an answer; echo it in every reply, e.g. in Python: print(json.dumps({\"id\": msg[\"id\"], \"success\": ok}), flush=True)";

impl ExternalVerifier {
    pub fn new(command: &str, timeout: Duration) -> Self {
        Self {
            command: command.to_string(),
            timeout,
            process: Mutex::new(None),
            broken: std::sync::OnceLock::new(),
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
        let id = process.next_id;
        process.next_id += 1;
        let request = json!({"id": id, "record": record, "answer": answer}).to_string();
        let deadline = Instant::now() + self.timeout;
        let failure = if process.requests.send(request).is_err() {
            "verifier stopped reading".to_string()
        } else {
            match self.reply_to(process, id, deadline) {
                Ok(verdict) => return verdict,
                Err(failure) => failure,
            }
        };
        let ended = slot.take().map(Process::kill).unwrap_or_default();
        let ended = if failure.starts_with("verifier exited") {
            ended
        } else {
            String::new()
        };
        Verdict::fail(format!("{failure}{ended}; restarted"))
    }

    /// Waits until `deadline` for the reply to request `id`, skipping stale
    /// replies to earlier requests; `Err` says why there is none.
    fn reply_to(&self, process: &Process, id: u64, deadline: Instant) -> Result<Verdict, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match process.lines.recv_timeout(left) {
                Ok(Ok(line)) => match parse_reply(&line)? {
                    (None, _) => {
                        let _ = self.broken.set(MISSING_ID.to_string());
                        return Err(MISSING_ID.to_string());
                    }
                    (Some(echoed), _) if echoed < id => continue,
                    (Some(echoed), _) if echoed > id => {
                        return Err(format!(
                            "verifier printed garbage (a reply to request {echoed} while waiting for {id})"
                        ))
                    }
                    (_, verdict) => return Ok(verdict),
                },
                Ok(Err(why)) => return Err(format!("verifier printed {why}")),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "verifier timed out after {:.1}s",
                        self.timeout.as_secs_f64()
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => return Err("verifier exited".into()),
            }
        }
    }
}

/// A reply line: the request id it echoes, if any, and its verdict.
fn parse_reply(line: &str) -> Result<(Option<u64>, Verdict), String> {
    let shown: String = line.chars().take(80).collect();
    let garbage = |why: String| format!("verifier printed garbage ({why})");
    let v: Value =
        serde_json::from_str(line).map_err(|_| garbage(format!("not JSON: '{shown}'")))?;
    let success = v
        .get("success")
        .and_then(Value::as_bool)
        .ok_or_else(|| garbage(format!("no boolean 'success' in '{shown}'")))?;
    let id = match v.get("id") {
        None | Some(Value::Null) => None,
        Some(id) => Some(
            id.as_u64()
                .ok_or_else(|| garbage(format!("'id' is not a request id in '{shown}'")))?,
        ),
    };
    let reason = v
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or(if success { "correct" } else { "incorrect" });
    Ok((
        id,
        Verdict {
            success,
            reason: reason.to_string(),
        },
    ))
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

    fn broken(&self) -> Option<String> {
        self.broken.get().cloned()
    }
}
