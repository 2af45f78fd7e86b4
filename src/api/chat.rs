//! OpenAI-compatible inference: `POST /v1/chat/completions`, `POST /v1/completions` and
//! `GET /v1/models`. `model` is a base as jobs name it, a fine-tuned model
//! `ft:{base}:{suffix}:{job id}` (or a checkpoint's `…:ckpt-step-N`), or a job id; a job's
//! adapter is served over its base (see [`crate::inference`]) to the API key that owns the job.
//! `stream: true` answers OpenAI's chunks as Server-Sent Events ending with `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Map, Value};

use super::openai::{fine_tuned_model_name, parse_fine_tuned_model};
use super::{ApiError, Owner};
use crate::inference::Served;
use crate::job::{CheckpointRef, JobId, JobStatus};
use crate::state::AppState;
use crate::train::generate::{self, Sampling};
use crate::train::tokenizer::Message;

/// The longest prompt a request may send, in tokens.
const MAX_PROMPT_TOKENS: usize = 8192;
/// The most tokens an answer may have, and what it gets when it names no limit.
const MAX_ANSWER_TOKENS: usize = 4096;
const DEFAULT_ANSWER_TOKENS: usize = 512;

fn model_not_found(model: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!("the model {model:?} does not exist or this key may not use it: {why}"),
    )
    .param("model")
}

/// The model a request names, loaded: a job's adapter over its base, or a base.
async fn resolve(state: &AppState, owner: &Owner, model: &str) -> Result<Arc<Served>, ApiError> {
    let named = parse_fine_tuned_model(model)
        .or_else(|| JobId::parse(model).map(|job| CheckpointRef { job, step: None }));
    let Some(CheckpointRef { job, step }) = named else {
        crate::model_access::check_base_model(&state.config, model)
            .map_err(|why| model_not_found(model, why))?;
        return state
            .models
            .base(model)
            .await
            .map_err(|e| model_not_found(model, e));
    };
    let row = state
        .db
        .get_job(&job, owner.as_deref())
        .await?
        .ok_or_else(|| model_not_found(model, "no such job"))?;
    if step.is_none() && row.status != JobStatus::Succeeded {
        return Err(model_not_found(
            model,
            format!(
                "job {job} is {}; its model exists once it has succeeded",
                row.status
            ),
        ));
    }
    let spec = &row.spec;
    let key = match step {
        Some(n) => format!("{job}:{n}"),
        None => job.to_string(),
    };
    if let Some(loaded) = state.models.loaded_adapter(&key) {
        return Ok(loaded);
    }
    if let Some(n) = step {
        let recorded = state.db.list_checkpoints(&job).await?;
        if !recorded.iter().any(|c| c.step as u64 == n) {
            return Err(model_not_found(
                model,
                format!("job {job} has no checkpoint at step {n}"),
            ));
        }
    }
    let dir = state
        .artifacts
        .init_adapter_dir(&job, step)
        .await
        .map_err(|e| model_not_found(model, e))?;
    state
        .models
        .load_adapter(&key, &spec.base_model, &dir)
        .await
        .map_err(|e| model_not_found(model, e))
}

fn number(req: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match req.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(ApiError::bad(key, "must be a number")),
    }
}

/// The sampling a request asks for, OpenAI's defaults where it is silent (temperature 1).
fn sampling(req: &Map<String, Value>) -> Result<Sampling, ApiError> {
    if let Some(n) = number(req, "n")? {
        if n != 1.0 {
            return Err(ApiError::bad(
                "n",
                "qtune answers one choice per request (n = 1)",
            ));
        }
    }
    if req.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::bad(
            "logprobs",
            "log probabilities are not returned",
        ));
    }
    let max_tokens = match (
        number(req, "max_completion_tokens")?,
        number(req, "max_tokens")?,
    ) {
        (Some(n), _) | (None, Some(n)) => {
            if !(n >= 1.0 && n.fract() == 0.0 && n as usize <= MAX_ANSWER_TOKENS) {
                return Err(ApiError::bad(
                    "max_tokens",
                    format!("must be a whole number from 1 to {MAX_ANSWER_TOKENS}"),
                ));
            }
            n as usize
        }
        (None, None) => DEFAULT_ANSWER_TOKENS,
    };
    let stop = match req.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad("stop", "must be a string or an array of strings"))?,
        Some(_) => {
            return Err(ApiError::bad(
                "stop",
                "must be a string or an array of strings",
            ))
        }
    };
    let seed = match number(req, "seed")? {
        Some(s) if s >= 0.0 && s.fract() == 0.0 => s as u64,
        Some(_) => return Err(ApiError::bad("seed", "must be a whole number ≥ 0")),
        // no seed asked for: a fresh one, as OpenAI's answers differ call to call
        None => rand::random(),
    };
    let s = Sampling {
        max_tokens,
        temperature: number(req, "temperature")?.unwrap_or(1.0),
        top_p: number(req, "top_p")?.unwrap_or(1.0),
        top_k: number(req, "top_k")?
            .map(|k| k.max(0.0) as usize)
            .unwrap_or(0),
        seed,
        stop,
        repetition_penalty: number(req, "repetition_penalty")?.unwrap_or(1.0),
        frequency_penalty: number(req, "frequency_penalty")?.unwrap_or(0.0),
        presence_penalty: number(req, "presence_penalty")?.unwrap_or(0.0),
    };
    s.check()
        .map_err(|(field, why)| ApiError::bad(field, why))?;
    Ok(s)
}

/// A message's text: a string, or OpenAI's content parts of type `text`.
fn content_text(content: Option<&Value>, param: &str) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(
                |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                    _ => Err(ApiError::bad(
                        param,
                        "only text content parts are understood",
                    )),
                },
            )
            .collect::<Result<Vec<_>, _>>()
            .map(|t| t.concat()),
        Some(_) => Err(ApiError::bad(
            param,
            "must be a string or an array of text parts",
        )),
    }
}

fn chat_messages(req: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let Some(Value::Array(list)) = req.get("messages") else {
        return Err(ApiError::bad(
            "messages",
            "missing: an array of {role, content}",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::bad("messages", "must not be empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let role = match m.get("role").and_then(Value::as_str) {
                Some("system" | "developer") => "system",
                Some(r @ ("user" | "assistant" | "tool")) => r,
                _ => {
                    return Err(ApiError::bad(
                        &format!("{param}.role"),
                        "must be system, developer, user, assistant or tool",
                    ))
                }
            };
            let mut message = Message::new(
                role,
                content_text(m.get("content"), &format!("{param}.content"))?,
            );
            message.tool_calls = m.get("tool_calls").filter(|v| v.is_array()).cloned();
            message.tool_call_id = m
                .get("tool_call_id")
                .and_then(Value::as_str)
                .map(str::to_string);
            Ok(message)
        })
        .collect()
}

struct Completion {
    served: Arc<Served>,
    prompt: Vec<u32>,
    sampling: Sampling,
    model: String,
    stream: bool,
    include_usage: bool,
    /// `chat.completion` or `text_completion`.
    chat: bool,
}

async fn completion(
    state: &AppState,
    owner: &Owner,
    req: &Map<String, Value>,
    chat: bool,
) -> Result<Completion, ApiError> {
    let model = match req.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => {
            return Err(ApiError::bad(
                "model",
                "missing: a base model, a fine_tuned_model or a job id",
            ))
        }
    };
    let sampling = sampling(req)?;
    let text = if chat {
        chat_messages(req)?;
        None
    } else {
        match req.get("prompt") {
            Some(Value::String(p)) if !p.is_empty() => Some(p.clone()),
            _ => {
                return Err(ApiError::bad(
                    "prompt",
                    "missing: the text to continue (one string)",
                ))
            }
        }
    };
    // no tokenizer reads more text than the longest prompt could hold (a token is rarely longer
    // than 32 bytes): a huge body is refused before it costs any work
    let text_bytes: usize = match &text {
        Some(t) => t.len(),
        None => req
            .get("messages")
            .map(|m| m.to_string().len())
            .unwrap_or(0),
    };
    if text_bytes > MAX_PROMPT_TOKENS * 32 {
        return Err(ApiError::bad(
            if chat { "messages" } else { "prompt" },
            format!("{text_bytes} bytes, more than a {MAX_PROMPT_TOKENS}-token prompt can hold"),
        ));
    }
    let served = resolve(state, owner, &model).await?;
    let tok = served.tokenizer();
    let raw = text.is_some();
    let prompt_text = match text {
        Some(t) => t,
        None => {
            let tools = req.get("tools").filter(|t| t.is_array());
            if tools.is_some() && !tok.template_takes_tools() {
                return Err(ApiError::bad(
                    "tools",
                    "this model's chat template does not render tools",
                ));
            }
            tok.render_chat_with_tools(&chat_messages(req)?, tools, true)
                .map_err(|e| ApiError::bad("messages", e.to_string()))?
        }
    };
    // a completion's raw text gets the tokenizer's own special tokens (a BOS); a rendered
    // chat template has written its own
    let prompt = if raw {
        tok.encode_prompt(&prompt_text)
    } else {
        tok.encode(&prompt_text)
    }
    .map_err(|e| ApiError::bad(if chat { "messages" } else { "prompt" }, e.to_string()))?;
    if prompt.len() > MAX_PROMPT_TOKENS {
        return Err(ApiError::bad(
            if chat { "messages" } else { "prompt" },
            format!(
                "{} tokens, more than the {MAX_PROMPT_TOKENS} a request may send",
                prompt.len()
            ),
        ));
    }
    if prompt.is_empty() {
        return Err(ApiError::bad(
            if chat { "messages" } else { "prompt" },
            "renders to no tokens",
        ));
    }
    Ok(Completion {
        served,
        prompt,
        sampling,
        model,
        stream: req.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: req
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        chat,
    })
}

fn usage(prompt: usize, answer: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer})
}

/// Runs a completion: the whole answer as one object, or its chunks as they are decoded.
async fn answer(state: &AppState, c: Completion) -> Result<Response, ApiError> {
    let created = time::OffsetDateTime::now_utc().unix_timestamp();
    let id = format!(
        "{}-{}",
        if c.chat { "chatcmpl" } else { "cmpl" },
        uuid::Uuid::new_v4().simple()
    );
    let object = if c.chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    let chunk_object = if c.chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    if !c.stream {
        let Completion {
            served,
            prompt,
            sampling,
            ..
        } = c;
        let result = state
            .models
            .run(move || {
                generate::generate(
                    served.model(),
                    served.tokenizer(),
                    &prompt,
                    &sampling,
                    &mut |_| true,
                )
            })
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "generation_failed",
                    e.to_string(),
                )
            })?;
        let choice = if object == "chat.completion" {
            json!({"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": null},
                   "finish_reason": result.finish.as_str(), "logprobs": null})
        } else {
            json!({"index": 0, "text": result.text, "finish_reason": result.finish.as_str(), "logprobs": null})
        };
        return Ok(Json(json!({
            "id": id, "object": object, "created": created, "model": c.model,
            "choices": [choice], "usage": usage(result.prompt_tokens, result.tokens.len()),
            "system_fingerprint": null,
        }))
        .into_response());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(64);
    let chunk = {
        let (id, model) = (id.clone(), c.model.clone());
        move |choices: Value, usage: Value| {
            json!({"id": id, "object": chunk_object, "created": created, "model": model,
                   "choices": choices, "usage": usage, "system_fingerprint": null})
        }
    };
    let chat = c.chat;
    let piece = move |text: &str| {
        if chat {
            json!([{"index": 0, "delta": {"content": text}, "finish_reason": null, "logprobs": null}])
        } else {
            json!([{"index": 0, "text": text, "finish_reason": null, "logprobs": null}])
        }
    };
    let models = state.models.clone();
    let Completion {
        served,
        prompt,
        sampling,
        include_usage,
        ..
    } = c;
    tokio::spawn(async move {
        if chat {
            let first = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null, "logprobs": null}]);
            let _ = tx.send(chunk(first, Value::Null)).await;
        }
        let sender = tx.clone();
        let chunk_of = chunk.clone();
        let result = models
            .run(move || {
                generate::generate(
                    served.model(),
                    served.tokenizer(),
                    &prompt,
                    &sampling,
                    &mut |text| {
                        // a closed channel: the client went away, and the decode stops
                        sender
                            .blocking_send(chunk_of(piece(text), Value::Null))
                            .is_ok()
                    },
                )
            })
            .await;
        match result {
            Ok(g) => {
                let end = if chat {
                    json!([{"index": 0, "delta": {}, "finish_reason": g.finish.as_str(), "logprobs": null}])
                } else {
                    json!([{"index": 0, "text": "", "finish_reason": g.finish.as_str(), "logprobs": null}])
                };
                let _ = tx.send(chunk(end, Value::Null)).await;
                if include_usage {
                    let _ = tx
                        .send(chunk(json!([]), usage(g.prompt_tokens, g.tokens.len())))
                        .await;
                }
            }
            Err(e) => {
                let _ = tx
                    .send(json!({"error": {"message": e.to_string(), "type": "server_error", "code": "generation_failed", "param": null}}))
                    .await;
            }
        }
    });
    let events = futures_util::stream::unfold((rx, false), |(mut rx, done)| async move {
        if done {
            return None;
        }
        match rx.recv().await {
            Some(v) => Some((
                Ok::<Event, Infallible>(Event::default().data(v.to_string())),
                (rx, false),
            )),
            None => Some((Ok(Event::default().data("[DONE]")), (rx, true))),
        }
    });
    Ok(Sse::new(events).into_response())
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = super::json_object(&headers, &body?, "a chat request")?;
    let c = completion(&state, &owner, &req, true).await?;
    answer(&state, c).await
}

/// `POST /v1/completions`: a raw prompt continued, no chat template.
pub async fn completions(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = super::json_object(&headers, &body?, "a completion request")?;
    let c = completion(&state, &owner, &req, false).await?;
    answer(&state, c).await
}

/// `GET /v1/models`: the fine-tuned models of the caller's succeeded jobs, newest first, and the
/// bases they were trained from.
pub async fn models(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
) -> Result<Json<Value>, ApiError> {
    let rows = state
        .db
        .list_jobs(owner.as_deref(), Some(JobStatus::Succeeded), None, 100)
        .await?;
    let mut data = Vec::new();
    let mut bases: Vec<String> = Vec::new();
    for row in &rows {
        let spec = &row.spec;
        data.push(json!({
            "id": fine_tuned_model_name(spec, &row.id),
            "object": "model",
            "created": row.finished_at.as_deref().map(crate::job::unix_seconds).unwrap_or(0),
            "owned_by": format!("org-{}", row.owner.as_deref().unwrap_or("qtune")),
        }));
        if !bases.contains(&spec.base_model) {
            bases.push(spec.base_model.clone());
        }
    }
    for base in bases {
        data.push(json!({"id": base, "object": "model", "created": 0, "owned_by": "qtune"}));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}
