//! `r3 serve`: a model behind an OpenAI-compatible HTTP API, with vLLM's
//! token-id extensions, so that r3's own loop (`--engine`), the `openai`
//! client, evaluation harnesses and agent frameworks can all sample from
//! it. Routes: `POST /v1/completions`, `POST /v1/chat/completions`,
//! `GET /v1/models`, `GET /health`. Handlers (axum, on two threads) parse
//! and check requests; one scheduler thread owns the decoder and batches
//! the requests that wait together.

#![forbid(unsafe_code)]

pub mod api;
pub mod scheduler;
mod stream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use r3_generate::{Completion, FinishReason, ScoredPrompt};
use r3_loop::model::Model;
use r3_loop::ChatEncoder;
use r3_model::lora::Adapter;
use r3_model::{Llama, LoadedModel};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

use api::{ApiError, ApiResult, Prompt, Request};
use scheduler::{Done, Job, Rows};

/// Largest request body read; a larger one gets 413.
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// What `r3 serve` runs with.
pub struct ServeConfig {
    pub address: SocketAddr,
    /// The name `/v1/models` lists and requests may give as `model`.
    pub name: String,
    /// Requests must carry `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// Most rows decoded at once.
    pub max_rows: usize,
}

/// What can stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {address}: {cause}")]
    Bind {
        address: SocketAddr,
        cause: std::io::Error,
    },
    #[error("the HTTP server stopped: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves `model` until the process ends. `ready` is called once the
/// socket listens (the CLI prints the address there).
pub fn serve(
    model: Model,
    config: ServeConfig,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    // Two threads answer HTTP; the decoder has a thread of its own.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.address)
            .await
            .map_err(|cause| ServeError::Bind {
                address: config.address,
                cause,
            })?;
        let address = listener.local_addr()?;
        let Model { loaded, llama, .. } = model;
        let model = Arc::new(loaded);
        let (jobs, queue) = mpsc::channel::<Job>(scheduler::QUEUE);
        {
            let model = Arc::clone(&model);
            let max_rows = config.max_rows;
            // The decoder's operations start from a pool thread (see
            // r3_kernels::pool); the server's own threads wait on sockets.
            std::thread::spawn(move || {
                r3_kernels::pool::run_in_pool(|| scheduler::run(model, queue, max_rows))
            });
        }
        let state = Arc::new(Server {
            model,
            base: Arc::new(llama),
            adapters: RwLock::new(HashMap::new()),
            config,
            jobs,
            ids: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/health", get(health))
            .route("/v1/models", get(models))
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat))
            .route("/v1/load_lora_adapter", post(load_adapter))
            .route("/v1/unload_lora_adapter", post(unload_adapter))
            .fallback(|| async { ApiError::new(404, "no such route") })
            .method_not_allowed_fallback(|| async {
                ApiError::new(405, "this method is not allowed on this route")
            })
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(state);
        ready(address);
        axum::serve(listener, app).await?;
        Ok(())
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(self.body())).into_response()
    }
}

type Shared = State<Arc<Server>>;

async fn health(State(server): Shared, headers: HeaderMap) -> ApiResult<Json<Value>> {
    server.authorize(&headers)?;
    Ok(Json(json!({})))
}

async fn models(State(server): Shared, headers: HeaderMap) -> ApiResult<Json<Value>> {
    server.authorize(&headers)?;
    Ok(Json(server.models()))
}

async fn completions(
    State(server): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    server.authorize(&headers)?;
    let request = api::completion_request(&json_body(body)?)?;
    let prompts = server.completion_prompts(&request)?;
    if request.stream {
        return stream::reply(server, request, prompts, stream::Route::Completions).await;
    }
    Ok(Json(server.completions(request, prompts).await?).into_response())
}

async fn chat(
    State(server): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    server.authorize(&headers)?;
    let (request, messages, tools) = api::chat_request(&json_body(body)?)?;
    let prompt = server.chat_prompt(&messages, tools.as_ref())?;
    if request.stream {
        return stream::reply(server, request, vec![prompt], stream::Route::Chat).await;
    }
    Ok(Json(server.chat(request, prompt).await?).into_response())
}

/// vLLM's `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`: a PEFT
/// directory loaded onto the base (sharing its weights), served under
/// `lora_name`.
async fn load_adapter(
    State(server): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    server.authorize(&headers)?;
    let body = json_body(body)?;
    let name = string_field(&body, "lora_name")?;
    let path = string_field(&body, "lora_path")?;
    if name == server.config.name || server.adapters().contains_key(name) {
        return Err(ApiError::bad(
            "lora_name",
            format!("{name} is already served; unload it first"),
        ));
    }
    let adapter = Adapter::load(std::path::Path::new(path))
        .map_err(|e| ApiError::bad("lora_path", e.to_string()))?;
    let decoder = server
        .base
        .with_adapter(&adapter.config, &adapter.weights)
        .map_err(|e| {
            ApiError::bad(
                "lora_path",
                format!("{path} does not fit the served model: {e}"),
            )
        })?;
    server
        .adapters
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(name.to_string(), Arc::new(decoder));
    Ok(Json(json!({"loaded": name})))
}

/// vLLM's `POST /v1/unload_lora_adapter {"lora_name"}`; requests already
/// queued for it still finish.
async fn unload_adapter(
    State(server): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    server.authorize(&headers)?;
    let body = json_body(body)?;
    let name = string_field(&body, "lora_name")?;
    let removed = server
        .adapters
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .remove(name);
    match removed {
        Some(_) => Ok(Json(json!({"unloaded": name}))),
        None => Err(ApiError::new(404, format!("no adapter {name} is loaded"))),
    }
}

fn string_field<'a>(body: &'a Value, key: &str) -> ApiResult<&'a str> {
    body[key]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad(key, "is required, as a non-empty string"))
}

/// A request's JSON body, at most [`MAX_BODY_BYTES`].
fn json_body(body: Result<Bytes, BytesRejection>) -> ApiResult<Value> {
    let bytes = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            413,
            format!("the body is larger than {MAX_BODY_BYTES} bytes"),
        ),
        status => ApiError::new(status.as_u16(), rejection.body_text()),
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(400, format!("the body is not valid JSON: {e}")))
}

pub(crate) struct Server {
    pub(crate) model: Arc<LoadedModel>,
    base: Arc<Llama>,
    /// Loaded adapters by name, each sharing the base's weights.
    adapters: RwLock<HashMap<String, Arc<Llama>>>,
    pub(crate) config: ServeConfig,
    jobs: mpsc::Sender<Job>,
    pub(crate) ids: AtomicU64,
}

impl Server {
    fn authorize(&self, headers: &HeaderMap) -> ApiResult<()> {
        let Some(key) = &self.config.api_key else {
            return Ok(());
        };
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(token) if token == key => Ok(()),
            _ => Err(ApiError::new(
                401,
                "a valid API key is required (Authorization: Bearer KEY)",
            )),
        }
    }

    fn adapters(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Llama>>> {
        self.adapters
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The base model, then each loaded adapter with the base as its parent
    /// (as vLLM lists them).
    fn models(&self) -> Value {
        let context = self.model.config.max_position_embeddings;
        let mut data = vec![json!({
            "id": self.config.name,
            "object": "model",
            "owned_by": "r3",
            "max_model_len": context,
        })];
        let mut names: Vec<String> = self.adapters().keys().cloned().collect();
        names.sort();
        data.extend(names.into_iter().map(|name| {
            json!({"id": name, "object": "model", "owned_by": "r3",
                   "parent": self.config.name, "max_model_len": context})
        }));
        json!({"object": "list", "data": data})
    }

    /// Each token of a choice with its log-prob (null where none was
    /// computed: an echoed prompt's first token, or a GPU's on-device
    /// greedy argmax) and its alternatives: the echoed prompt's tokens
    /// (`scored`) first, then the sampled ones.
    fn choice_tokens(
        &self,
        prompt: Option<(&[u32], &ScoredPrompt)>,
        c: &Completion,
    ) -> Vec<TokenLogprob> {
        let mut out = Vec::new();
        if let Some((ids, scored)) = prompt {
            for (i, &t) in ids.iter().enumerate() {
                out.push(match i.checked_sub(1) {
                    Some(j) => {
                        let top = scored.alternatives.get(j).map_or(&[][..], |a| a);
                        self.token_logprob(t, Some(scored.logprobs[j]), top)
                    }
                    None => self.token_logprob(t, None, &[]),
                });
            }
        }
        for (i, &t) in c.tokens.iter().enumerate() {
            let logprob = c.logprobs.as_ref().map(|l| l[i]);
            let top = c.alternatives.get(i).map_or(&[][..], |a| a);
            out.push(self.token_logprob(t, logprob, top));
        }
        out
    }

    /// A token with its log-prob and alternatives, as text.
    pub(crate) fn token_logprob(
        &self,
        token: u32,
        logprob: Option<f32>,
        top: &[(u32, f32)],
    ) -> TokenLogprob {
        let top = top.iter().map(|&(t, l)| (self.token_text(t), l)).collect();
        (self.token_text(token), logprob, top)
    }

    fn token_text(&self, token: u32) -> String {
        self.model.tokenizer.decode(&[token]).unwrap_or_default()
    }

    /// The decoder a request's `model` names: the base (or none given),
    /// or a loaded adapter.
    fn decoder(&self, request: &Request) -> ApiResult<Arc<Llama>> {
        match &request.model {
            None => Ok(Arc::clone(&self.base)),
            Some(name) if *name == self.config.name => Ok(Arc::clone(&self.base)),
            Some(name) => self.adapters().get(name).cloned().ok_or_else(|| {
                ApiError::new(
                    404,
                    format!(
                        "the model {name} does not exist here; this server serves {} and its loaded adapters",
                        self.config.name
                    ),
                )
            }),
        }
    }

    /// A completion request's prompts as ids (texts encoded).
    fn completion_prompts(&self, request: &Request) -> ApiResult<Vec<Vec<u32>>> {
        let tokenizer = &self.model.tokenizer;
        request
            .prompts
            .iter()
            .map(|p| match p {
                Prompt::Ids(ids) => Ok(ids.clone()),
                Prompt::Text(text) => tokenizer
                    .encode(text)
                    .map_err(|e| ApiError::new(400, format!("prompt: {e}"))),
            })
            .collect()
    }

    /// A chat's prompt: the messages (and tools) in the model's template.
    fn chat_prompt(
        &self,
        messages: &[r3_model::Message],
        tools: Option<&Value>,
    ) -> ApiResult<Vec<u32>> {
        let loaded = &self.model;
        let chat = ChatEncoder::new(&loaded.chat_template, &loaded.tokenizer, &loaded.eos_token);
        chat.prompt(messages, tools)
            .map_err(|e| ApiError::bad("messages", e.to_string()))
    }

    async fn completions(&self, request: Request, prompts: Vec<Vec<u32>>) -> ApiResult<Value> {
        let (done, usage) = self.generate(&request, prompts.clone()).await?;
        Ok(self.reply(&request, &prompts, &done, usage, stream::Route::Completions))
    }

    async fn chat(&self, request: Request, prompt: Vec<u32>) -> ApiResult<Value> {
        let prompts = vec![prompt];
        let (done, usage) = self.generate(&request, prompts.clone()).await?;
        Ok(self.reply(&request, &prompts, &done, usage, stream::Route::Chat))
    }

    /// Prompt `p`'s text as the request gave it (ids decoded), for `echo`.
    fn prompt_text(&self, request: &Request, ids: &[u32], p: usize) -> String {
        match request.prompts.get(p) {
            Some(Prompt::Text(text)) => text.clone(),
            _ => self.model.tokenizer.decode(ids).unwrap_or_default(),
        }
    }

    /// The whole reply of either route: one choice per completion, in the
    /// route's own shape, with the echoed prompt, log-probs and token ids
    /// when asked.
    fn reply(
        &self,
        request: &Request,
        prompts: &[Vec<u32>],
        done: &Done,
        usage: Value,
        route: stream::Route,
    ) -> Value {
        let choices: Vec<Value> = done
            .completions
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let p = index / request.n;
                let echoed = done
                    .scored
                    .get(p)
                    .map(|scored| (prompts[p].as_slice(), scored));
                let mut choice = json!({
                    "index": index,
                    "logprobs": null,
                    "finish_reason": finish_reason(c),
                });
                match route {
                    stream::Route::Completions => {
                        choice["text"] = match echoed {
                            Some((ids, _)) => json!(self.prompt_text(request, ids, p) + &c.text),
                            None => json!(c.text),
                        }
                    }
                    stream::Route::Chat => {
                        choice["message"] = json!({"role": "assistant", "content": c.text})
                    }
                }
                if request.logprobs {
                    let tokens = self.choice_tokens(echoed, c);
                    choice["logprobs"] = logprobs_json(route, &tokens, request.top_logprobs);
                }
                if request.return_token_ids {
                    choice["token_ids"] = json!(c.tokens);
                }
                choice
            })
            .collect();
        json!({
            "id": self.reply_id(route),
            "object": route.object(),
            "created": now(),
            "model": self.config.name,
            "choices": choices,
            "usage": usage,
        })
    }

    /// A fresh reply id in the route's style (`cmpl-N`, `chatcmpl-N`).
    pub(crate) fn reply_id(&self, route: stream::Route) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        match route {
            stream::Route::Completions => format!("cmpl-{n}"),
            stream::Route::Chat => format!("chatcmpl-{n}"),
        }
    }

    /// Checks the prompts against the model, queues the job and waits for
    /// its completions; returns them with the usage counts.
    async fn generate(
        &self,
        request: &Request,
        prompts: Vec<Vec<u32>>,
    ) -> ApiResult<(Done, Value)> {
        let (answer, prompt_tokens) = self.submit(request, prompts, None).await?;
        let done = answer
            .await
            .map_err(|_| ApiError::new(503, "the scheduler has stopped"))?
            .map_err(|e| ApiError::new(500, e))?;
        let completion_tokens: usize = done.completions.iter().map(|c| c.tokens.len()).sum();
        let usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        });
        Ok((done, usage))
    }

    /// Checks the prompts against the model and queues the job (its tokens
    /// sent to `stream` as they are sampled, when given); returns where
    /// its completions will come, and its prompt tokens.
    pub(crate) async fn submit(
        &self,
        request: &Request,
        prompts: Vec<Vec<u32>>,
        stream: Option<mpsc::UnboundedSender<scheduler::StreamedToken>>,
    ) -> ApiResult<(Answer, usize)> {
        let decoder = self.decoder(request)?;
        let config = &self.model.config;
        let context = config.max_position_embeddings;
        let rows = prompts.len() * request.n;
        if rows > api::MAX_ROWS {
            return Err(ApiError::bad(
                "n",
                format!(
                    "{rows} completions in one request; at most {}",
                    api::MAX_ROWS
                ),
            ));
        }
        let mut params = request.params.clone();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if longest >= context {
            return Err(ApiError::bad(
                "prompt",
                format!("{longest} tokens; the model's context is {context}"),
            ));
        }
        if params.max_new_tokens == usize::MAX {
            // Chat's default: the rest of the context.
            params.max_new_tokens = context - longest;
        }
        if longest + params.max_new_tokens > context {
            return Err(ApiError::bad(
                "max_tokens",
                format!(
                    "{} after a {longest}-token prompt passes the model's context of {context}",
                    params.max_new_tokens
                ),
            ));
        }
        if let Some(&bad) = prompts
            .iter()
            .flatten()
            .find(|&&t| t as usize >= config.vocab_size)
        {
            return Err(ApiError::bad(
                "prompt",
                format!(
                    "token id {bad} is outside the vocabulary of {}",
                    config.vocab_size
                ),
            ));
        }
        let mut stop_token_ids = self.model.eos_token_ids.clone();
        stop_token_ids.extend(&request.stop_token_ids);
        stop_token_ids.sort_unstable();
        stop_token_ids.dedup();
        let prompt_tokens: usize = prompts.iter().map(Vec::len).sum::<usize>() * request.n;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            decoder,
            rows: prompts
                .into_iter()
                .map(|prompt| Rows {
                    prompt,
                    n: request.n,
                })
                .collect(),
            params,
            stop_token_ids,
            logprobs: request.logprobs,
            top_logprobs: request.top_logprobs,
            echo: request.echo,
            stream,
            reply,
        };
        self.jobs
            .send(job)
            .await
            .map_err(|_| ApiError::new(503, "the scheduler has stopped"))?;
        Ok((answer, prompt_tokens))
    }
}

/// Where a queued job's completions arrive.
pub(crate) type Answer = oneshot::Receiver<Result<scheduler::Done, String>>;

/// OpenAI's finish reasons: an end-of-turn id or a stop string is "stop".
/// A token's text, its log-prob (none where none was computed) and its
/// alternatives' texts and log-probs.
pub(crate) type TokenLogprob = (String, Option<f32>, Vec<(String, f32)>);

/// A choice's `logprobs` in the route's shape, for `tokens` (a whole
/// reply's, or one streamed chunk's).
pub(crate) fn logprobs_json(
    route: stream::Route,
    tokens: &[TokenLogprob],
    top_logprobs: usize,
) -> Value {
    match route {
        stream::Route::Completions => {
            // OpenAI's legacy shape: one {text: log-prob} object per token
            // (null for an echoed prompt's first); a text several tokens
            // share keeps the most likely one's.
            let top: Option<Vec<Value>> = (top_logprobs > 0).then(|| {
                tokens
                    .iter()
                    .map(|(_, logprob, top)| {
                        if logprob.is_none() && top.is_empty() {
                            return Value::Null;
                        }
                        let mut object = Map::new();
                        for (t, l) in top {
                            object.entry(t.clone()).or_insert(json!(l));
                        }
                        Value::Object(object)
                    })
                    .collect()
            });
            json!({
                "tokens": tokens.iter().map(|t| &t.0).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.1).collect::<Vec<_>>(),
                "top_logprobs": top, "text_offset": null,
            })
        }
        stream::Route::Chat => {
            let content: Vec<Value> = tokens
                .iter()
                .map(|(t, l, top)| {
                    let top: Vec<Value> = top
                        .iter()
                        .map(|(t, l)| json!({"token": t, "logprob": l, "bytes": t.as_bytes()}))
                        .collect();
                    json!({"token": t, "logprob": l, "bytes": t.as_bytes(), "top_logprobs": top})
                })
                .collect();
            json!({"content": content})
        }
    }
}

pub(crate) fn finish_reason(c: &Completion) -> &'static str {
    match c.finish {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
