//! Streamed replies (`"stream": true`): server-sent events carrying each
//! choice's text as it is sampled, OpenAI's chunk objects, then
//! `data: [DONE]`. Text goes out only once it decodes to whole characters
//! and extends what was sent; the end-of-turn token is never sent. With
//! stop strings, text is held until the choice ends (a stop string's first
//! characters must not go out before it is recognised). With `logprobs`,
//! each chunk carries its tokens' log-probs (and alternatives) in the
//! route's shape. A client that goes away ends the stream; its rows finish
//! in their batch unseen.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::{ApiResult, Request};
use crate::scheduler::StreamedToken;
use crate::{finish_reason, logprobs_json, now, Server, TokenLogprob};

/// Which route's chunk objects to send.
#[derive(Clone, Copy)]
pub(crate) enum Route {
    Completions,
    Chat,
}

impl Route {
    /// The `object` of a whole reply.
    pub(crate) fn object(self) -> &'static str {
        match self {
            Route::Completions => "text_completion",
            Route::Chat => "chat.completion",
        }
    }
}

/// Queues the job and answers with its event stream.
pub(crate) async fn reply(
    server: Arc<Server>,
    request: Request,
    prompts: Vec<Vec<u32>>,
    route: Route,
) -> ApiResult<Response> {
    let choices = prompts.len() * request.n;
    let (tokens, mut sampled) = mpsc::unbounded_channel();
    let (mut answer, _) = server.submit(&request, prompts, Some(tokens)).await?;
    let (events, outgoing) = mpsc::channel::<String>(64);
    let id = server.reply_id(route);
    let hold = !request.params.stop_strings.is_empty();
    tokio::spawn(async move {
        let (name, created) = (server.config.name.clone(), now());
        let (logprobs, top) = (request.logprobs, request.top_logprobs);
        // Each chunk carries the log-probs of the tokens sampled since the
        // last one it sent (held text, and the end-of-turn token, go with
        // the next chunk that is sent).
        let chunk = |choice: usize,
                     text: &str,
                     finish: Option<&str>,
                     tokens: &mut Vec<TokenLogprob>|
         -> String {
            let logprobs = match logprobs {
                true => logprobs_json(route, &std::mem::take(tokens), top),
                false => Value::Null,
            };
            let body = match route {
                Route::Completions => json!({
                    "id": id, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": choice, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                }),
                Route::Chat => {
                    let delta = match finish {
                        Some(_) if text.is_empty() => json!({}),
                        _ => json!({"content": text}),
                    };
                    json!({
                        "id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [{"index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                    })
                }
            };
            body.to_string()
        };
        if let Route::Chat = route {
            for choice in 0..choices {
                let role = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                    "model": name, "choices": [{"index": choice, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null}]});
                if events.send(role.to_string()).await.is_err() {
                    return;
                }
            }
        }
        let eos = &server.model.eos_token_ids;
        let mut ids: Vec<Vec<u32>> = vec![Vec::new(); choices];
        let mut sent: Vec<String> = vec![String::new(); choices];
        let mut unsent: Vec<Vec<TokenLogprob>> = vec![Vec::new(); choices];
        loop {
            tokio::select! {
                // Tokens first: every one is queued before the answer is.
                biased;
                Some(sampled) = sampled.recv() => {
                    let StreamedToken { choice, token, logprob, alternatives } = sampled;
                    if logprobs {
                        unsent[choice].push(server.token_logprob(token, logprob, &alternatives));
                    }
                    if hold || eos.contains(&token) {
                        continue;
                    }
                    ids[choice].push(token);
                    let Ok(text) = server.model.tokenizer.decode(&ids[choice]) else { continue };
                    if text.ends_with('\u{FFFD}') || !text.starts_with(sent[choice].as_str()) {
                        continue;
                    }
                    if text.len() > sent[choice].len() {
                        let delta = chunk(choice, &text[sent[choice].len()..], None, &mut unsent[choice]);
                        if events.send(delta).await.is_err() {
                            return;
                        }
                        sent[choice] = text;
                    }
                }
                result = &mut answer => {
                    let last: Vec<String> = match result {
                        Ok(Ok(done)) => done
                            .completions
                            .iter()
                            .enumerate()
                            .map(|(choice, c)| {
                                let rest = c.text.strip_prefix(sent[choice].as_str()).unwrap_or("");
                                chunk(choice, rest, Some(finish_reason(c)), &mut unsent[choice])
                            })
                            .collect(),
                        Ok(Err(e)) => vec![json!({"error": {"message": e, "type": "server_error", "code": 500}}).to_string()],
                        Err(_) => vec![json!({"error": {"message": "the scheduler has stopped", "type": "server_error", "code": 503}}).to_string()],
                    };
                    for event in last {
                        if events.send(event).await.is_err() {
                            return;
                        }
                    }
                    let _ = events.send("[DONE]".into()).await;
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(outgoing, |mut outgoing| async move {
        let data = outgoing.recv().await?;
        Some((Ok::<_, Infallible>(Event::default().data(data)), outgoing))
    });
    Ok(Sse::new(stream).into_response())
}
