//! Inference engines behind OpenAI-compatible servers (vLLM, SGLang,
//! `r3 serve`) as the source of the loop's samples. r3 still renders the
//! chat template and sends token ids, and reads back the sampled ids
//! (vLLM's `return_token_ids`), so token-in/token-out holds: the ids a
//! rollout trains on are the ids the engine sampled. Requests are spread
//! over the engines, several in flight at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use r3_generate::{Completion, FinishReason, SamplingParams};
use r3_model::Tokenizer;
use serde_json::{json, Value};

use crate::{LoopError, Result};

/// Requests in flight per engine: enough to fill a server's running batch.
const IN_FLIGHT_PER_ENGINE: usize = 16;

/// How long one completion request may take before the run stops.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// OpenAI-compatible servers that sample for the loop.
pub struct Engines {
    urls: Vec<String>,
    /// The `model` field of each request: the served model (or a loaded
    /// adapter's name).
    pub model: String,
    agent: ureq::Agent,
}

impl Engines {
    /// Engines at `urls` (each a base such as `http://127.0.0.1:8000`),
    /// serving `model`. A URL that is not http(s) is refused here, before
    /// any request.
    pub fn new(urls: &[String], model: &str) -> Result<Self> {
        if urls.is_empty() {
            return Err(LoopError::Invalid("--engine needs at least one URL".into()));
        }
        let urls = urls
            .iter()
            .map(|u| base_url(u))
            .collect::<Result<Vec<_>>>()?;
        let agent = ureq::AgentBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .max_idle_connections_per_host(IN_FLIGHT_PER_ENGINE)
            .build();
        Ok(Self {
            urls,
            model: model.to_string(),
            agent,
        })
    }

    /// The first model `url`'s `/v1/models` lists: what a single-model
    /// server (vLLM, SGLang, `r3 serve`) serves.
    pub fn served_model(url: &str) -> Result<String> {
        let endpoint = format!("{}/v1/models", base_url(url)?);
        let failed = |what: String| LoopError::Invalid(format!("engine {endpoint}: {what}"));
        let value: Value = ureq::get(&endpoint)
            .timeout(Duration::from_secs(30))
            .call()
            .map_err(|e| failed(e.to_string()))?
            .into_json()
            .map_err(|e| failed(format!("the reply is not JSON: {e}")))?;
        value["data"][0]["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| failed("lists no model; name one with --engine-model".into()))
    }

    /// Loads the PEFT directory `path` on every engine under `name` (vLLM's
    /// `/v1/load_lora_adapter`; vLLM needs
    /// `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`). `path` must be readable by
    /// the engines: the same file system, or a shared one.
    pub fn load_adapter(&self, name: &str, path: &std::path::Path) -> Result<()> {
        let body = json!({"lora_name": name, "lora_path": path});
        self.post_everywhere("/v1/load_lora_adapter", &body)
    }

    /// Unloads the adapter `name` from every engine.
    pub fn unload_adapter(&self, name: &str) -> Result<()> {
        self.post_everywhere("/v1/unload_lora_adapter", &json!({"lora_name": name}))
    }

    fn post_everywhere(&self, route: &str, body: &Value) -> Result<()> {
        for url in &self.urls {
            let endpoint = format!("{url}{route}");
            match self.agent.post(&endpoint).send_json(body) {
                Ok(_) => {}
                Err(ureq::Error::Status(code, reply)) => {
                    let text = reply.into_string().unwrap_or_default();
                    return Err(LoopError::Invalid(format!(
                        "engine {endpoint}: HTTP {code}: {}",
                        text.trim()
                    )));
                }
                Err(e) => return Err(LoopError::Invalid(format!("engine {endpoint}: {e}"))),
            }
        }
        Ok(())
    }

    /// The engines' base URLs, as runs record them.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// `copies` completions of every prompt, in order (prompt-major), each
    /// decoded with `tokenizer` exactly as r3's own decoder would: the
    /// end-of-turn id kept in `tokens` and cut from `text`, the text cut at
    /// a stop string. Prompt `p` asks for the seed of stream
    /// `first_row + p * copies`, so reruns sample alike on engines that
    /// honour seeds.
    pub fn complete(
        &self,
        prompts: &[Vec<u32>],
        copies: usize,
        params: &SamplingParams,
        first_row: u64,
        tokenizer: &Tokenizer,
        eos_token_ids: &[u32],
    ) -> Result<Vec<Completion>> {
        let results: Mutex<Vec<Option<Vec<Completion>>>> =
            Mutex::new((0..prompts.len()).map(|_| None).collect());
        let next = AtomicUsize::new(0);
        let workers = (self.urls.len() * IN_FLIGHT_PER_ENGINE).min(prompts.len());
        let error: Mutex<Option<LoopError>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let p = next.fetch_add(1, Ordering::Relaxed);
                    if p >= prompts.len() || error.lock().expect("not poisoned").is_some() {
                        return;
                    }
                    let url = &self.urls[p % self.urls.len()];
                    let seed = stream_seed(params.seed, first_row + (p * copies) as u64);
                    let outcome = self
                        .request(url, &prompts[p], copies, params, seed, eos_token_ids)
                        .and_then(|choices| {
                            choices
                                .into_iter()
                                .map(|c| completion(c, params, tokenizer, eos_token_ids))
                                .collect::<Result<Vec<_>>>()
                        });
                    match outcome {
                        Ok(c) => results.lock().expect("not poisoned")[p] = Some(c),
                        Err(e) => {
                            error.lock().expect("not poisoned").get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        if let Some(e) = error.into_inner().expect("not poisoned") {
            return Err(e);
        }
        Ok(results
            .into_inner()
            .expect("not poisoned")
            .into_iter()
            .flat_map(|c| c.expect("every prompt answered"))
            .collect())
    }

    /// One `/v1/completions` request for `copies` samples of `prompt`;
    /// returns each choice's sampled ids and finish reason.
    fn request(
        &self,
        url: &str,
        prompt: &[u32],
        copies: usize,
        params: &SamplingParams,
        seed: u64,
        eos_token_ids: &[u32],
    ) -> Result<Vec<EngineChoice>> {
        let mut body = json!({
            "model": self.model,
            "prompt": prompt,
            "n": copies,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": seed,
            // vLLM's extensions: stop on every end-of-turn id, and return
            // the sampled ids.
            "stop_token_ids": eos_token_ids,
            "return_token_ids": true,
            "skip_special_tokens": false,
            // The sampled tokens' log-probs (no alternatives).
            "logprobs": 0,
        });
        if params.top_k > 0 {
            body["top_k"] = params.top_k.into();
        }
        if !params.stop_strings.is_empty() {
            body["stop"] = json!(params.stop_strings);
        }
        let endpoint = format!("{url}/v1/completions");
        let failed = |what: String| LoopError::Invalid(format!("engine {endpoint}: {what}"));
        let reply = match self.agent.post(&endpoint).send_json(body) {
            Ok(reply) => reply,
            Err(ureq::Error::Status(code, reply)) => {
                let text = reply.into_string().unwrap_or_default();
                return Err(failed(format!("HTTP {code}: {}", text.trim())));
            }
            Err(e) => return Err(failed(e.to_string())),
        };
        let value: Value = reply
            .into_json()
            .map_err(|e| failed(format!("the reply is not JSON: {e}")))?;
        let choices = value["choices"]
            .as_array()
            .ok_or_else(|| failed("the reply has no choices".into()))?;
        if choices.len() != copies {
            return Err(failed(format!(
                "asked for {copies} choices, got {}",
                choices.len()
            )));
        }
        choices
            .iter()
            .map(|c| {
                let ids = c["token_ids"].as_array().ok_or_else(|| {
                    failed(
                        "a choice has no token_ids: r3 needs the sampled ids (vLLM's \
                         return_token_ids; SGLang and r3 serve return them too)"
                            .into(),
                    )
                })?;
                let tokens = ids
                    .iter()
                    .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| failed("a token id is not a u32".into()))?;
                let logprobs = c["logprobs"]["token_logprobs"].as_array().and_then(|l| {
                    l.iter()
                        .map(|x| x.as_f64().map(|x| x as f32))
                        .collect::<Option<Vec<f32>>>()
                        .filter(|l| l.len() == tokens.len())
                });
                Ok(EngineChoice {
                    tokens,
                    logprobs,
                    stopped: c["finish_reason"] == "stop",
                })
            })
            .collect()
    }
}

/// An engine's base URL, `http(s)://host:port`, from what a user may
/// write (a trailing `/` or `/v1` is dropped).
fn base_url(u: &str) -> Result<String> {
    let base = u.trim().trim_end_matches('/').trim_end_matches("/v1");
    match base.starts_with("http://") || base.starts_with("https://") {
        true => Ok(base.to_string()),
        false => Err(LoopError::Invalid(format!(
            "--engine {u}: expected an http:// or https:// URL"
        ))),
    }
}

/// What one choice of an engine's reply says.
struct EngineChoice {
    tokens: Vec<u32>,
    /// The engine's log-prob of each sampled id, when it gave them all.
    logprobs: Option<Vec<f32>>,
    /// `finish_reason` was "stop" (an end-of-turn id or a stop string),
    /// not "length".
    stopped: bool,
}

/// A choice as r3's decoder reports a row: an engine that stopped on an
/// end-of-turn id without returning it gets it back (r3's conversations
/// end a turn with it), so that `tokens` always hold the whole turn.
fn completion(
    choice: EngineChoice,
    params: &SamplingParams,
    tokenizer: &Tokenizer,
    eos_token_ids: &[u32],
) -> Result<Completion> {
    let (mut tokens, mut logprobs) = (choice.tokens, choice.logprobs);
    let ends_eos = tokens.last().is_some_and(|t| eos_token_ids.contains(t));
    let body = match ends_eos {
        true => &tokens[..tokens.len() - 1],
        false => &tokens[..],
    };
    let mut text = tokenizer.decode(body)?;
    let cut = params
        .stop_strings
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min();
    let finish = match (ends_eos, cut, choice.stopped) {
        (true, _, _) => FinishReason::Eos,
        (false, Some(cut), _) => {
            text.truncate(cut);
            FinishReason::Stop
        }
        (false, None, true) => {
            tokens.push(eos_token_ids[0]);
            // The appended id was not reported: no log-prob for it.
            logprobs = None;
            FinishReason::Eos
        }
        (false, None, false) => FinishReason::Length,
    };
    Ok(Completion {
        alternatives: Vec::new(),
        tokens,
        logprobs,
        text,
        finish,
    })
}

/// The seed of sampling stream `stream` under `seed`: distinct streams get
/// unrelated seeds (a SplitMix64 step), as r3's own samplers get distinct
/// streams of one generator.
fn stream_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & (i64::MAX as u64)
}
