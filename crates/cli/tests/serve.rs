//! `r3 serve` and `--engine`: the server answers OpenAI-style requests and
//! refuses bad ones with JSON errors, and an evaluation sampled through it
//! is the in-process evaluation, transcript for transcript.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

/// A running `r3 serve` on a free port, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(model: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_r3"))
            .args(["serve", "--model", model, "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().rsplit(' ').next().unwrap().to_string();
        assert!(url.starts_with("http://127.0.0.1:"), "{line}");
        Self { child, url }
    }

    /// POSTs `body` to `path`: (status, JSON reply).
    fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let reply = ureq::post(&format!("{}{path}", self.url))
            .set("Content-Type", "application/json")
            .send_string(body);
        read(reply)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read(reply: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let response = match reply {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let status = response.status();
    (status, response.into_json().unwrap())
}

#[test]
fn completions_and_chat_answer_with_token_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = common::tiny_model_and_data(dir.path(), 1, "1");
    let server = Server::start(&model, &[]);
    let (status, v) = read(ureq::get(&format!("{}/v1/models", server.url)).call());
    assert_eq!(status, 200);
    let name = v["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(name, "tiny");
    let body = json!({"model": name, "prompt": [[1, 2, 3], [4, 5]], "n": 3, "max_tokens": 5,
                      "temperature": 0.9, "seed": 4, "return_token_ids": true});
    let (status, v) = server.post("/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6, "{v}");
    for c in choices {
        let ids = c["token_ids"].as_array().unwrap();
        assert!(!ids.is_empty() && ids.len() <= 5, "{c}");
    }
    // The same seed gives the same choices, whatever else is batched.
    let (_, again) = server.post("/v1/completions", &body.to_string());
    assert_eq!(v["choices"], again["choices"]);
    let usage = &v["usage"];
    assert_eq!(usage["prompt_tokens"], 3 * 5);
    // The sampled tokens' log-probs, sampled and greedy: one per id, ≤ 0.
    for temperature in [0.9, 0.0] {
        let body = json!({"prompt": [[1, 2, 3]], "max_tokens": 5, "logprobs": 0,
                          "temperature": temperature, "return_token_ids": true});
        let (status, v) = server.post("/v1/completions", &body.to_string());
        assert_eq!(status, 200, "{v}");
        let choice = &v["choices"][0];
        let logprobs = choice["logprobs"]["token_logprobs"].as_array().unwrap();
        assert_eq!(
            logprobs.len(),
            choice["token_ids"].as_array().unwrap().len()
        );
        assert!(logprobs.iter().all(|l| l.as_f64().unwrap() <= 0.0), "{v}");
    }
    // Alternatives: greedy, the sampled token is the most likely one, so
    // its log-prob is the best alternative's.
    let body = json!({"prompt": [[1, 2, 3]], "max_tokens": 4, "logprobs": 3, "temperature": 0});
    let (status, v) = server.post("/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{v}");
    let logprobs = &v["choices"][0]["logprobs"];
    let tops = logprobs["top_logprobs"].as_array().unwrap();
    assert_eq!(
        tops.len(),
        logprobs["tokens"].as_array().unwrap().len(),
        "{v}"
    );
    for (top, sampled) in tops
        .iter()
        .zip(logprobs["token_logprobs"].as_array().unwrap())
    {
        let top = top.as_object().unwrap();
        assert!((1..=3).contains(&top.len()), "{v}");
        let best = top
            .values()
            .map(|l| l.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!((best - sampled.as_f64().unwrap()).abs() < 1e-6, "{v}");
    }
    // Echo, as lm-evaluation-harness scores a continuation: the prompt's
    // own tokens scored (the first has no log-prob), and a greedy token's
    // log-prob the same whether sampled or scored as part of the prompt.
    let prompt = [1u32, 2, 3, 4];
    let body = json!({"prompt": prompt, "max_tokens": 1, "logprobs": 0, "temperature": 0,
                      "return_token_ids": true});
    let (_, sampled) = server.post("/v1/completions", &body.to_string());
    let next = sampled["choices"][0]["token_ids"][0].as_u64().unwrap() as u32;
    let sampled_logprob = sampled["choices"][0]["logprobs"]["token_logprobs"][0]
        .as_f64()
        .unwrap();
    let whole: Vec<u32> = prompt.iter().copied().chain([next]).collect();
    for max_tokens in [0, 2] {
        let body = json!({"prompt": whole, "max_tokens": max_tokens, "echo": true,
                          "logprobs": 1, "temperature": 0});
        let (status, v) = server.post("/v1/completions", &body.to_string());
        assert_eq!(status, 200, "{v}");
        let logprobs = &v["choices"][0]["logprobs"];
        let scores = logprobs["token_logprobs"].as_array().unwrap();
        assert_eq!(scores.len(), whole.len() + max_tokens, "{v}");
        assert!(
            scores[0].is_null() && logprobs["top_logprobs"][0].is_null(),
            "{v}"
        );
        let scored = scores[whole.len() - 1].as_f64().unwrap();
        assert!(
            (scored - sampled_logprob).abs() < 1e-4,
            "{scored} vs {sampled_logprob}"
        );
        let top = logprobs["top_logprobs"][whole.len() - 1]
            .as_object()
            .unwrap();
        assert_eq!(top.len(), 1, "{v}");
        assert!(v["choices"][0]["text"].as_str().is_some(), "{v}");
    }
    let (status, v) = server.post(
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 0}).to_string(),
    );
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("max_tokens")),
        "{v}"
    );
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                      "logprobs": true, "top_logprobs": 2, "temperature": 0});
    let (status, v) = server.post("/v1/chat/completions", &chat.to_string());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());
    for item in v["choices"][0]["logprobs"]["content"].as_array().unwrap() {
        let top = item["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2, "{item}");
        assert_eq!(top[0]["logprob"], item["logprob"], "{item}");
    }
}

#[test]
fn bad_requests_get_json_errors_and_the_server_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = common::tiny_model_and_data(dir.path(), 1, "1");
    let server = Server::start(&model, &["--api-key", "secret"]);
    let authorized = |path: &str, body: &str| {
        read(
            ureq::post(&format!("{}{path}", server.url))
                .set("Authorization", "Bearer secret")
                .send_string(body),
        )
    };
    let (status, v) = server.post("/v1/completions", r#"{"prompt": "a"}"#);
    assert_eq!(status, 401, "{v}");
    for (body, status, needle) in [
        ("{bad json", 400, "not valid JSON"),
        (r#"{"prompt": "a", "frobnicate": 1}"#, 400, "frobnicate"),
        (r#"{"prompt": "a", "max_tokens": -5}"#, 400, "max_tokens"),
        (
            r#"{"prompt": "a", "max_tokens": 100000000}"#,
            400,
            "context",
        ),
        (r#"{"prompt": [999999]}"#, 400, "vocabulary"),
        (r#"{"prompt": "a", "model": "gpt-9"}"#, 404, "gpt-9"),
        (
            r#"{"prompt": "a", "n": 64, "max_tokens": 1, "prompt": [[1],[2],[3],[4],[5]]}"#,
            400,
            "at most",
        ),
    ] {
        let (got, v) = authorized("/v1/completions", body);
        assert_eq!(got, status, "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
    // An oversized body gets 413, or (when the server answers before the
    // client has finished sending) its connection is dropped.
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(9 << 20));
    let reply = ureq::post(&format!("{}/v1/completions", server.url))
        .set("Authorization", "Bearer secret")
        .send_string(&huge);
    match reply {
        Err(ureq::Error::Status(code, r)) => {
            assert_eq!(code, 413);
            let v: Value = r.into_json().unwrap();
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("larger than"),
                "{v}"
            );
        }
        Err(ureq::Error::Transport(_)) => {}
        Ok(r) => panic!("an oversized body was accepted: {}", r.status()),
    }
    let (status, _) = authorized("/v1/nothing", "{}");
    assert_eq!(status, 404);
    let (status, v) = read(
        ureq::get(&format!("{}/v1/completions", server.url))
            .set("Authorization", "Bearer secret")
            .call(),
    );
    assert_eq!(status, 405, "{v}");
    let (status, v) = authorized("/v1/completions", r#"{"prompt": "a", "max_tokens": 2}"#);
    assert_eq!(status, 200, "{v}");
}

/// Greedy evaluation sampled by `r3 serve` through `--engine` writes the
/// same summary and the same transcripts as r3's own decoder, and mining
/// through it binds its failures to the engine.
#[test]
fn eval_on_an_engine_is_eval_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = common::tiny_model_and_data(dir.path(), 12, "5");
    let server = Server::start(&model, &[]);
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let eval = |name: &str, model: &str, engine: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            model,
            "--task",
            "answer",
            "--data",
            &data,
            "--max-new-tokens",
            "6",
            "--reflection-max-tokens",
            "6",
            "--batch-rows",
            "5",
        ];
        let dir = out(name);
        args.extend(["--out", &dir]);
        args.extend(engine);
        let (ok, _, err) = common::r3(&args);
        assert!(ok, "{err}");
    };
    eval("local", &model, &[]);
    // The engine run reads only the model's config and tokenizer files:
    // its weights live on the engine.
    let files = dir.path().join("tiny-without-weights");
    std::fs::create_dir(&files).unwrap();
    for entry in std::fs::read_dir(&model).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            std::fs::copy(&path, files.join(path.file_name().unwrap())).unwrap();
        }
    }
    let model = files.to_str().unwrap().to_string();
    eval("engine", &model, &["--engine", &server.url]);
    for file in ["summary.json", "transcripts.jsonl"] {
        let local = std::fs::read_to_string(dir.path().join("local").join(file)).unwrap();
        let engine = std::fs::read_to_string(dir.path().join("engine").join(file)).unwrap();
        assert_eq!(local, engine, "{file}");
    }
    // Mining, with the engines from a config file, as a list.
    let failures = out("failures.jsonl");
    let config = dir.path().join("mine.toml");
    std::fs::write(
        &config,
        format!("engines = [{:?}]\nsamples = 2\n", server.url),
    )
    .unwrap();
    let (ok, _, err) = common::r3(&[
        "mine",
        "--config",
        config.to_str().unwrap(),
        "--model",
        &model,
        "--task",
        "answer",
        "--data",
        &data,
        "--max-new-tokens",
        "4",
        "--out",
        &failures,
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("sampling from 1 engine"), "{err}");
    let state = std::fs::read_to_string(format!("{failures}.state")).unwrap();
    assert!(state.contains(&server.url), "{state}");
}

/// A PEFT adapter for `model` whose B matrices are not zero, so that it
/// changes the model's output.
fn adapter_for(model: &str, dir: &std::path::Path) {
    let loaded = r3_model::load(std::path::Path::new(model)).unwrap();
    let lora = r3_model::lora::LoraConfig::new(4, 8.0, &["all-linear".to_string()]).unwrap();
    let (llama, vars) =
        r3_model::Llama::with_lora(&loaded.config, &loaded.weights, &lora, None, 3).unwrap();
    for (name, var) in &vars {
        if name.contains("lora_B") {
            let noise = var.as_tensor().randn_like(0.0, 0.5).unwrap();
            var.set(&noise).unwrap();
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    r3_model::lora::Adapter::save(dir, &lora, model, &llama.adapter_weights()).unwrap();
}

/// vLLM's adapter routes: an adapter loaded at run time is listed, answers
/// under its name with other tokens than the base, and is gone once
/// unloaded; a corrupt adapter directory gets a 400 naming it.
#[test]
fn adapters_load_serve_and_unload() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = common::tiny_model_and_data(dir.path(), 1, "1");
    let adapter = dir.path().join("adapter");
    adapter_for(&model, &adapter);
    let server = Server::start(&model, &[]);
    let load = json!({"lora_name": "run-step-1", "lora_path": adapter});
    let (status, v) = server.post("/v1/load_lora_adapter", &load.to_string());
    assert_eq!(status, 200, "{v}");
    let (status, v) = server.post("/v1/load_lora_adapter", &load.to_string());
    assert_eq!(status, 400, "{v}");
    let (_, v) = read(ureq::get(&format!("{}/v1/models", server.url)).call());
    assert_eq!(v["data"][1]["id"], "run-step-1", "{v}");
    assert_eq!(v["data"][1]["parent"], "tiny", "{v}");
    let ask = |name: &str| {
        let body = json!({"model": name, "prompt": [[1, 2, 3]], "max_tokens": 6,
                          "temperature": 0, "return_token_ids": true});
        server.post("/v1/completions", &body.to_string())
    };
    let (_, base) = ask("tiny");
    let (status, adapted) = ask("run-step-1");
    assert_eq!(status, 200, "{adapted}");
    assert_ne!(
        base["choices"][0]["token_ids"], adapted["choices"][0]["token_ids"],
        "the adapter changed nothing"
    );
    let unload = json!({"lora_name": "run-step-1"});
    let (status, _) = server.post("/v1/unload_lora_adapter", &unload.to_string());
    assert_eq!(status, 200);
    let (status, _) = ask("run-step-1");
    assert_eq!(status, 404);
    let (status, _) = server.post("/v1/unload_lora_adapter", &unload.to_string());
    assert_eq!(status, 404);
    std::fs::write(
        adapter.join("adapter_model.safetensors"),
        b"not safetensors",
    )
    .unwrap();
    let (status, v) = server.post("/v1/load_lora_adapter", &load.to_string());
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["param"] == "lora_path", "{v}");
}

/// Two `r3 serve` processes sample a two-step LoRA run's rollouts: before
/// each step's rollouts the adapter as it stands is loaded on both under a
/// new name and the previous one unloaded; every transcript names the
/// version it came from, and the engines end serving the trained adapter.
/// Full fine-tuning with engines is refused.
#[test]
fn lora_training_samples_on_engines_and_pushes_each_step() {
    let dir = tempfile::tempdir().unwrap();
    let (model, verifier, failures) = common::mined_tiny_run(dir.path(), 8, "3", 2, "4");
    let failures = failures.as_str();
    let servers = [Server::start(&model, &[]), Server::start(&model, &[])];
    let urls = format!("{},{}", servers[0].url, servers[1].url);
    let out = dir.path().join("run");
    let sets = [
        format!("model={model:?}"),
        format!("verifier={verifier:?}"),
        format!("failures={failures:?}"),
        format!("output_dir={:?}", out.to_str().unwrap()),
        "max_steps=2".into(),
        "failures_per_step=2".into(),
        "num_generations=3".into(),
        "max_completion_length=4".into(),
        "retry_max_tokens=4".into(),
        "save_steps=0".into(),
    ];
    let mut args: Vec<&str> = vec!["train", "--engine", &urls];
    args.extend(sets.iter().flat_map(|s| ["--set", s.as_str()]));
    let (ok, _, err) = common::r3(&args);
    assert!(!ok && err.contains("use_peft = true"), "{err}");
    args.extend(["--use-peft", "--lora-r", "4"]);
    let (ok, _, err) = common::r3(&args);
    assert!(ok, "{err}");
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    let versions: std::collections::BTreeSet<String> = samples
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["adapter"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        versions.into_iter().collect::<Vec<_>>(),
        ["run-step-0", "run-step-1"],
        "{samples}"
    );
    for server in &servers {
        let (_, v) = read(ureq::get(&format!("{}/v1/models", server.url)).call());
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["tiny", "run-step-2"], "{v}");
    }
    let kept: Vec<_> = std::fs::read_dir(out.join("engine-adapters"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(kept, ["run-step-2"]);
    // The sampler–trainer gap, measured on the trained tokens: r3 serve
    // samples with the same kernels as the trainer scores, so ~0.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let trained: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|m| m["trained_tokens"].as_u64() > Some(0))
        .collect();
    assert!(!trained.is_empty(), "no step trained: {metrics}");
    for m in trained {
        let gap = m["logprob_gap_max"].as_f64().unwrap();
        let ratio = m["importance_ratio_mean"].as_f64().unwrap();
        assert!(gap < 1e-3 && (ratio - 1.0).abs() < 1e-3, "{m}");
    }
}

/// The data of each server-sent event of a streamed reply.
fn events(server: &Server, path: &str, body: &Value) -> Vec<String> {
    let reply = ureq::post(&format!("{}{path}", server.url))
        .send_json(body.clone())
        .unwrap();
    assert!(reply.content_type().contains("text/event-stream"));
    reply
        .into_string()
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// Streamed replies carry the same text as the whole reply, in pieces,
/// then [DONE]; a client that leaves mid-stream does not hurt the server.
#[test]
fn streamed_replies_add_up_to_the_whole_reply() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = common::tiny_model_and_data(dir.path(), 1, "1");
    let server = Server::start(&model, &[]);
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                      "temperature": 0.0});
    let (_, whole) = server.post("/v1/chat/completions", &chat.to_string());
    let mut streamed = chat.clone();
    streamed["stream"] = true.into();
    let data = events(&server, "/v1/chat/completions", &streamed);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    let completion = json!({"prompt": "hello", "max_tokens": 8, "temperature": 0.0, "n": 2});
    let (_, whole) = server.post("/v1/completions", &completion.to_string());
    let mut streamed = completion.clone();
    streamed["stream"] = true.into();
    let data = events(&server, "/v1/completions", &streamed);
    for choice in 0..2 {
        let text: String = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .filter(|c| c["choices"][0]["index"] == choice)
            .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
            .collect();
        assert_eq!(text, whole["choices"][choice]["text"].as_str().unwrap());
    }
    // Log-probs stream with their tokens: the chunks' pieces, joined, are
    // the whole reply's (tokens, log-probs and alternatives).
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                      "temperature": 0.7, "seed": 5, "logprobs": true, "top_logprobs": 2});
    let (_, whole) = server.post("/v1/chat/completions", &chat.to_string());
    let mut streamed = chat.clone();
    streamed["stream"] = true.into();
    let pieces: Vec<Value> = events(&server, "/v1/chat/completions", &streamed)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    let expected = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert!(!expected.is_empty());
    assert_eq!(&pieces, expected);
    let completion = json!({"prompt": "hello", "max_tokens": 8, "temperature": 0.0, "n": 2,
                            "logprobs": 1});
    let (_, whole) = server.post("/v1/completions", &completion.to_string());
    let mut streamed = completion.clone();
    streamed["stream"] = true.into();
    let data = events(&server, "/v1/completions", &streamed);
    for choice in 0..2 {
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .filter(|c| c["choices"][0]["index"] == choice)
            .collect();
        for key in ["tokens", "token_logprobs", "top_logprobs"] {
            let joined: Vec<Value> = chunks
                .iter()
                .flat_map(|c| c["choices"][0]["logprobs"][key].as_array().unwrap().clone())
                .collect();
            assert_eq!(
                &joined,
                whole["choices"][choice]["logprobs"][key]
                    .as_array()
                    .unwrap(),
                "{key}"
            );
        }
    }
    // A client that reads one event and goes away.
    {
        use std::io::{Read, Write};
        let address = server.url.trim_start_matches("http://");
        let mut socket = std::net::TcpStream::connect(address).unwrap();
        let body = json!({"prompt": "hello", "max_tokens": 200, "stream": true}).to_string();
        write!(socket, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut first = [0u8; 64];
        let _ = socket.read(&mut first).unwrap();
    }
    let (status, _) = read(ureq::get(&format!("{}/health", server.url)).call());
    assert_eq!(status, 200);
    let (status, _) = server.post("/v1/completions", &completion.to_string());
    assert_eq!(status, 200);
}

/// Continuous batching: a short request sent while a long one is decoding
/// joins the running batch and is answered while the long one still
/// streams, not after it; and both replies are what each gets alone
/// (their budgets differ, which used to keep them in separate batches).
#[test]
fn a_request_joins_a_running_batch_and_leaves_it_first() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = common::tiny_model_and_data(dir.path(), 1, "1");
    let server = Server::start(&model, &[]);
    let long = json!({"prompt": [5, 80, 81], "max_tokens": 1500, "temperature": 1.0,
                      "seed": 3, "stream": true, "return_token_ids": true});
    let short = json!({"prompt": [9, 10, 11], "max_tokens": 3, "temperature": 1.0, "seed": 4,
                       "return_token_ids": true});
    // (token ids, text) of a reply.
    let reply = |v: &Value| -> (Vec<u64>, String) {
        let choice = &v["choices"][0];
        let ids = choice["token_ids"].as_array().unwrap();
        let ids = ids.iter().map(|t| t.as_u64().unwrap()).collect();
        (ids, choice["text"].as_str().unwrap().to_string())
    };
    let alone = |body: &Value| {
        let mut body = body.clone();
        body["stream"] = json!(false);
        let (status, v) = server.post("/v1/completions", &body.to_string());
        assert_eq!(status, 200, "{v}");
        reply(&v)
    };
    let (long_alone, short_alone) = (alone(&long), alone(&short));
    assert!(
        long_alone.0.len() > 200,
        "the long reply ended early: {:?}",
        long_alone.0
    );

    let (started, wait_started) = std::sync::mpsc::channel();
    let url = server.url.clone();
    let streamer = std::thread::spawn(move || {
        let reply = ureq::post(&format!("{url}/v1/completions"))
            .send_json(long)
            .unwrap();
        let mut events = Vec::new();
        for line in BufReader::new(reply.into_reader()).lines() {
            let line = line.unwrap();
            if let Some(data) = line.strip_prefix("data: ") {
                if events.is_empty() {
                    started.send(()).unwrap();
                }
                events.push(data.to_string());
            }
        }
        events
    });
    wait_started.recv().unwrap();
    let (status, v) = server.post("/v1/completions", &short.to_string());
    assert_eq!(status, 200, "{v}");
    assert!(
        !streamer.is_finished(),
        "the short request waited for the long one to finish"
    );
    assert_eq!(reply(&v), short_alone);
    let events = streamer.join().unwrap();
    let streamed: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(streamed, long_alone.1);
}
