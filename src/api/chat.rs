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
use serde_json::{json, Value};

mod logprobs;

use super::openai::{fine_tuned_model_name, parse_fine_tuned_model};
use super::{ApiError, Owner};
use crate::inference::{Refusal, Served, Ticket};
use crate::job::{CheckpointRef, JobId, JobStatus};
use crate::state::AppState;
use crate::train::generate::{Sampling, TokenConstraint, TokenLogprob};
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

/// `owner`'s uploaded adapter called `model`, loaded, if there is one (an adapter's name has
/// no '/': a path or Hub id costs no lookup).
async fn uploaded_adapter(
    state: &AppState,
    owner: &Owner,
    model: &str,
) -> Result<Option<Arc<Served>>, ApiError> {
    if model.contains('/') {
        return Ok(None);
    }
    match state.db.get_adapter(owner.as_deref(), model).await? {
        Some(row) => Ok(Some(crate::adapters::served(state, &row).await?)),
        None => Ok(None),
    }
}

/// The model a request names, loaded: a job's adapter over its base, or a base.
async fn resolve(state: &AppState, owner: &Owner, model: &str) -> Result<Arc<Served>, ApiError> {
    let named = parse_fine_tuned_model(model)
        .or_else(|| JobId::parse(model).map(|job| CheckpointRef { job, step: None }));
    let Some(CheckpointRef { job, step }) = named else {
        if let Some(adapter) = uploaded_adapter(state, owner, model).await? {
            return Ok(adapter);
        }
        crate::model_access::check_base_model(&state.config, model)
            .map_err(|why| model_not_found(model, why))?;
        return state
            .models
            .base(&state.config.model_source(model))
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
    let dir = state
        .stored_adapter(&row, step)
        .await
        .map_err(|e| match e {
            crate::state::StoredAdapterError::NoCheckpoint { .. } => model_not_found(model, e),
            e => ApiError::stored_adapter(e).param("model"),
        })?;
    state
        .models
        .load_adapter(&key, &state.config.model_source(&spec.base_model), &dir)
        .await
        .map_err(|e| {
            // the engine's words name files on this server: they go to the log only
            tracing::error!(model, error = %e, "loading a fine-tuned model failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "model_load_failed",
                format!("the model {model:?} could not be loaded (the server's log says why)"),
            )
            .param("model")
        })
}

/// A chat or completion request as OpenAI's SDK sends it, parsed straight into its fields: an
/// unknown field is skipped without building anything of it, and the free-form parts (`tools`,
/// a message's `tool_calls`) stay JSON text until a template renders them, so a body costs its
/// own size in memory, not many times it as a tree of values would.
#[derive(serde::Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    prompt: Option<String>,
    n: Option<f64>,
    logprobs: Option<Logprobs>,
    top_logprobs: Option<f64>,
    /// Kept as text until it is checked ([`ResponseFormat`], at most [`MAX_SCHEMA_BYTES`]).
    response_format: Option<Box<serde_json::value::RawValue>>,
    max_completion_tokens: Option<f64>,
    max_tokens: Option<f64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<f64>,
    seed: Option<f64>,
    stop: Option<Stop>,
    repetition_penalty: Option<f64>,
    logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// vLLM's and llama-server's extension: decode to `max_tokens` past end-of-turn tokens.
    ignore_eos: Option<bool>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    tools: Option<Box<serde_json::value::RawValue>>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `logprobs`: a chat's `true`/`false`, or a completion's count of alternatives (0 to 5).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Logprobs {
    Flag(bool),
    Count(f64),
}

/// OpenAI's `response_format`.
#[derive(serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(serde::Deserialize)]
struct JsonSchemaFormat {
    #[allow(dead_code)] // OpenAI requires it; the grammar does not use it
    name: String,
    schema: Option<Value>,
    /// The answer always follows the schema: `strict` changes nothing.
    #[allow(dead_code)]
    strict: Option<bool>,
}

/// The largest JSON schema a request may send.
const MAX_SCHEMA_BYTES: usize = 64 << 10;

#[derive(serde::Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(serde::Deserialize)]
struct ChatMessage {
    role: Option<String>,
    content: Option<Content>,
    tool_calls: Option<Box<serde_json::value::RawValue>>,
    tool_call_id: Option<String>,
}

/// A message's text: a string, or OpenAI's content parts.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(serde::Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl CompletionRequest {
    /// The body, or an error naming the field that does not parse.
    fn parse(headers: &HeaderMap, body: &[u8], what: &str) -> Result<CompletionRequest, ApiError> {
        super::require_json(headers, what)?;
        let mut de = serde_json::Deserializer::from_slice(body);
        let parsed: Result<CompletionRequest, _> = serde_path_to_error::deserialize(&mut de);
        let req = parsed.map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("the body is not JSON: {inner}"),
                )
                .param("body")
            } else if path == "." {
                ApiError::bad("body", format!("expected a JSON object: {inner}"))
            } else {
                ApiError::bad(&path, inner.to_string())
            }
        })?;
        de.end()
            .map_err(|e| ApiError::bad("body", format!("more after the JSON object: {e}")))?;
        Ok(req)
    }

    /// The sampling it asks for, OpenAI's defaults where it is silent (temperature 1).
    fn sampling(&self, chat: bool) -> Result<Sampling, ApiError> {
        if self.n.is_some_and(|n| n != 1.0) {
            return Err(ApiError::bad(
                "n",
                "qtune answers one choice per request (n = 1)",
            ));
        }
        let s = Sampling {
            max_tokens: self.max_tokens()?,
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.map(|k| k.max(0.0) as usize).unwrap_or(0),
            seed: match self.seed {
                Some(s) if s >= 0.0 && s.fract() == 0.0 => s as u64,
                Some(_) => return Err(ApiError::bad("seed", "must be a whole number ≥ 0")),
                // no seed asked for: a fresh one, as OpenAI's answers differ call to call
                None => rand::random(),
            },
            stop: match &self.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(list)) => list.clone(),
            },
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            logit_bias: self.logit_bias()?,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            logprobs: self.logprobs(chat)?,
        };
        s.check()
            .map_err(|(field, why)| ApiError::bad(field, why))?;
        Ok(s)
    }

    /// `logit_bias` as OpenAI sends it: token ids (as strings) to biases.
    fn logit_bias(&self) -> Result<Vec<(u32, f32)>, ApiError> {
        let Some(map) = &self.logit_bias else {
            return Ok(Vec::new());
        };
        map.iter()
            .map(|(id, &bias)| match id.parse::<u32>() {
                Ok(id) => Ok((id, bias as f32)),
                Err(_) => Err(ApiError::bad(
                    "logit_bias",
                    "keys are token ids (whole numbers as strings)",
                )),
            })
            .collect()
    }

    /// How many alternatives each token's log-probability comes with, if any: a chat's
    /// `logprobs: true` with `top_logprobs` (0 to 20), a completion's `logprobs` (0 to 5).
    fn logprobs(&self, chat: bool) -> Result<Option<usize>, ApiError> {
        let whole = |v: f64, most: f64| (v >= 0.0 && v <= most && v.fract() == 0.0).then_some(v);
        if chat {
            let on = match &self.logprobs {
                None | Some(Logprobs::Flag(false)) => false,
                Some(Logprobs::Flag(true)) => true,
                Some(Logprobs::Count(_)) => {
                    return Err(ApiError::bad(
                        "logprobs",
                        "a chat's logprobs is true or false",
                    ))
                }
            };
            return match (on, self.top_logprobs) {
                (false, None) => Ok(None),
                (false, Some(_)) => Err(ApiError::bad("top_logprobs", "needs logprobs: true")),
                (true, None) => Ok(Some(0)),
                (true, Some(n)) => whole(n, 20.0)
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| ApiError::bad("top_logprobs", "a whole number from 0 to 20")),
            };
        }
        match &self.logprobs {
            None => Ok(None),
            Some(Logprobs::Count(n)) => whole(*n, 5.0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| ApiError::bad("logprobs", "a whole number from 0 to 5")),
            Some(Logprobs::Flag(_)) => Err(ApiError::bad(
                "logprobs",
                "a completion's logprobs is a number of alternatives, 0 to 5",
            )),
        }
    }

    /// The JSON schema the answer must follow, if `response_format` asks for one.
    fn schema(&self) -> Result<Option<Value>, ApiError> {
        let Some(raw) = &self.response_format else {
            return Ok(None);
        };
        if raw.get().len() > MAX_SCHEMA_BYTES {
            return Err(ApiError::bad(
                "response_format",
                format!("more than {MAX_SCHEMA_BYTES} bytes"),
            ));
        }
        let mut de = serde_json::Deserializer::from_str(raw.get());
        let format: ResponseFormat = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let param = match path.as_str() {
                "." => "response_format".to_string(),
                p => format!("response_format.{p}"),
            };
            ApiError::bad(&param, e.into_inner().to_string())
        })?;
        match format {
            ResponseFormat::Text => Ok(None),
            ResponseFormat::JsonObject => Ok(Some(json!({"type": "object"}))),
            ResponseFormat::JsonSchema { json_schema } => {
                let param = "response_format.json_schema.schema";
                match json_schema.schema {
                    None => Err(ApiError::bad(param, "missing: the JSON schema to follow")),
                    Some(s) if !s.is_object() => {
                        Err(ApiError::bad(param, "a JSON schema is an object"))
                    }
                    Some(s) => Ok(Some(s)),
                }
            }
        }
    }

    /// `max_completion_tokens` (or the older `max_tokens`).
    fn max_tokens(&self) -> Result<usize, ApiError> {
        match self.max_completion_tokens.or(self.max_tokens) {
            None => Ok(DEFAULT_ANSWER_TOKENS),
            Some(n) if n >= 1.0 && n.fract() == 0.0 && n as usize <= MAX_ANSWER_TOKENS => {
                Ok(n as usize)
            }
            Some(_) => Err(ApiError::bad(
                "max_tokens",
                format!("must be a whole number from 1 to {MAX_ANSWER_TOKENS}"),
            )),
        }
    }

    /// The chat's messages as the template renders them.
    fn chat_messages(&self) -> Result<Vec<Message>, ApiError> {
        let Some(list) = &self.messages else {
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
                let role = match m.role.as_deref() {
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
                    content_text(m.content.as_ref(), &format!("{param}.content"))?,
                );
                message.tool_calls = match &m.tool_calls {
                    None => None,
                    Some(raw) => Some(serde_json::from_str::<Value>(raw.get()).map_err(|e| {
                        ApiError::bad(&format!("{param}.tool_calls"), e.to_string())
                    })?)
                    .filter(Value::is_array),
                };
                message.tool_call_id = m.tool_call_id.clone();
                Ok(message)
            })
            .collect()
    }

    /// The bytes of text the prompt is made of (a completion's prompt; a chat's contents,
    /// calls and tools).
    fn text_bytes(&self) -> usize {
        let content = |c: &Content| match c {
            Content::Text(t) => t.len(),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| p.text.as_ref().map_or(0, String::len))
                .sum(),
        };
        let messages: usize = self
            .messages
            .iter()
            .flatten()
            .map(|m| {
                m.content.as_ref().map_or(0, content)
                    + m.tool_calls.as_ref().map_or(0, |t| t.get().len())
            })
            .sum();
        messages
            + self.prompt.as_ref().map_or(0, String::len)
            + self.tools.as_ref().map_or(0, |t| t.get().len())
    }
}

/// A message's text: a string, or OpenAI's content parts of type `text`.
fn content_text(content: Option<&Content>, param: &str) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(s)) => Ok(s.clone()),
        Some(Content::Parts(parts)) => parts
            .iter()
            .map(|p| match (p.kind.as_str(), &p.text) {
                ("text", Some(t)) => Ok(t.as_str()),
                _ => Err(ApiError::bad(
                    param,
                    "only text content parts are understood",
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|t| t.concat()),
    }
}

struct Completion {
    served: Arc<Served>,
    prompt: Vec<u32>,
    sampling: Sampling,
    /// The grammar the answer follows (`response_format`).
    constraint: Option<Box<dyn TokenConstraint>>,
    /// Where the answer's log-probabilities are written, when asked for.
    logprobs: Option<logprobs::Logprobs>,
    /// Its place in the line to a batch.
    ticket: Ticket,
    model: String,
    stream: bool,
    include_usage: bool,
    /// `chat.completion` or `text_completion`.
    chat: bool,
}

async fn completion(
    state: &AppState,
    owner: &Owner,
    req: &CompletionRequest,
    chat: bool,
) -> Result<Completion, ApiError> {
    let model = match &req.model {
        Some(m) if !m.is_empty() => m.clone(),
        _ => {
            return Err(ApiError::bad(
                "model",
                "missing: a base model, a fine_tuned_model or a job id",
            ))
        }
    };
    let sampling = req.sampling(chat)?;
    let schema = req.schema()?;
    let prompt = check_prompt_size(req, chat)?;
    let served = resolve(state, owner, &model).await?;
    let prompt = encode_prompt(&served, req, prompt)?;
    let ticket = state
        .models
        .ticket(&served, prompt.len(), sampling.max_tokens, owner.as_deref())
        .map_err(|refusal| match refusal {
            Refusal::Busy => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "server_busy",
                "too many generations are waiting for a place in a batch: try again shortly",
            )
            .retry_after(1),
            Refusal::TooLarge {
                need_mib,
                budget_mib,
            } => ApiError::bad(
                "max_tokens",
                format!(
                    "the prompt and the longest answer need {need_mib} MiB of key/value \
                     cache, more than the server's {budget_mib} MiB: ask for fewer tokens"
                ),
            ),
        })?;
    let (constraint, logprobs) =
        structure(&served, schema, sampling.logprobs.is_some(), chat).await?;
    Ok(Completion {
        ticket,
        served,
        prompt,
        sampling,
        constraint,
        logprobs,
        model,
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        chat,
    })
}

/// The grammar compiled from `schema` and the writer of log-probabilities, when the request
/// asks for them (both need the model's vocabulary as bytes, built on a blocking thread the
/// first time, as a schema is compiled: an attacker's schema costs a thread, not the runtime).
async fn structure(
    served: &Arc<Served>,
    schema: Option<Value>,
    logprobs: bool,
    chat: bool,
) -> Result<(Option<Box<dyn TokenConstraint>>, Option<logprobs::Logprobs>), ApiError> {
    if schema.is_none() && !logprobs {
        return Ok((None, None));
    }
    let param = if schema.is_some() {
        "response_format"
    } else {
        "logprobs"
    };
    let served = served.clone();
    let built = tokio::task::spawn_blocking(move || {
        let vocabulary = served
            .vocabulary()
            .map_err(|e| ApiError::bad(param, format!("not available for this model: {e}")))?;
        let constraint = match schema {
            None => None,
            Some(schema) => Some(
                vocabulary
                    .json_schema(&schema)
                    .map_err(|e| ApiError::bad("response_format.json_schema.schema", e))?,
            ),
        };
        Ok::<_, ApiError>((constraint, vocabulary))
    })
    .await
    .map_err(|e| generation_failed(format!("compiling the schema: {e}")))??;
    let (constraint, vocabulary) = built;
    Ok((
        constraint.map(|c| Box::new(c) as Box<dyn TokenConstraint>),
        logprobs.then(|| logprobs::Logprobs::new(vocabulary, chat)),
    ))
}

/// What a request asks the model to continue.
enum Prompt {
    /// A completion's text, as it is.
    Text(String),
    /// A chat's messages, for the model's template.
    Chat(Vec<Message>),
}

/// Checks the prompt's shape and size before any model is loaded, and returns it. No tokenizer
/// reads more text than the longest prompt could hold (a token is rarely longer than 32 bytes):
/// a huge body is refused before it costs work.
fn check_prompt_size(req: &CompletionRequest, chat: bool) -> Result<Prompt, ApiError> {
    let prompt = if chat {
        Prompt::Chat(req.chat_messages()?)
    } else {
        match &req.prompt {
            Some(p) if !p.is_empty() => Prompt::Text(p.clone()),
            _ => {
                return Err(ApiError::bad(
                    "prompt",
                    "missing: the text to continue (one string)",
                ))
            }
        }
    };
    let text_bytes = req.text_bytes();
    if text_bytes > MAX_PROMPT_TOKENS * 32 {
        return Err(ApiError::bad(
            if chat { "messages" } else { "prompt" },
            format!("{text_bytes} bytes, more than a {MAX_PROMPT_TOKENS}-token prompt can hold"),
        ));
    }
    Ok(prompt)
}

/// The prompt's tokens: a completion's raw text with the tokenizer's own special tokens (a
/// BOS), or the chat rendered with the model's template (which writes its own).
fn encode_prompt(
    served: &Served,
    req: &CompletionRequest,
    prompt: Prompt,
) -> Result<Vec<u32>, ApiError> {
    let tok = served.tokenizer();
    let param = match prompt {
        Prompt::Text(_) => "prompt",
        Prompt::Chat(_) => "messages",
    };
    let prompt = match prompt {
        Prompt::Text(text) => tok.encode_prompt(&text),
        Prompt::Chat(messages) => {
            let tools: Option<Value> = match &req.tools {
                None => None,
                Some(raw) => Some(
                    serde_json::from_str(raw.get())
                        .map_err(|e| ApiError::bad("tools", e.to_string()))?,
                ),
            };
            let tools = tools.as_ref().filter(|t| t.is_array());
            if tools.is_some() && !tok.template_takes_tools() {
                return Err(ApiError::bad(
                    "tools",
                    "this model's chat template does not render tools",
                ));
            }
            let rendered = tok
                .render_chat_with_tools(&messages, tools, true)
                .map_err(|e| ApiError::bad("messages", e.to_string()))?;
            tok.encode(&rendered)
        }
    }
    .map_err(|e| ApiError::bad(param, e.to_string()))?;
    if prompt.len() > MAX_PROMPT_TOKENS {
        return Err(ApiError::bad(
            param,
            format!(
                "{} tokens, more than the {MAX_PROMPT_TOKENS} a request may send",
                prompt.len()
            ),
        ));
    }
    if prompt.is_empty() {
        return Err(ApiError::bad(param, "renders to no tokens"));
    }
    Ok(prompt)
}

fn usage(prompt: usize, answer: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer})
}

fn generation_failed(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "generation_failed",
        e.to_string(),
    )
}

/// The names an answer goes by: its id, its object types, its creation time.
#[derive(Clone)]
struct AnswerIds {
    id: String,
    model: String,
    created: i64,
    chat: bool,
}

impl AnswerIds {
    fn new(c: &Completion) -> AnswerIds {
        let prefix = if c.chat { "chatcmpl" } else { "cmpl" };
        AnswerIds {
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            model: c.model.clone(),
            created: time::OffsetDateTime::now_utc().unix_timestamp(),
            chat: c.chat,
        }
    }

    /// A streamed chunk of `choices` (and `usage`, on the last one when asked for).
    fn chunk(&self, choices: Value, usage: Value) -> Value {
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": choices, "usage": usage, "system_fingerprint": null})
    }

    /// A streamed choice: a piece of text and its tokens' log-probabilities, or (with
    /// `finish`) the end.
    fn delta(&self, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
        match (self.chat, finish) {
            (true, None) => {
                json!([{"index": 0, "delta": {"content": text}, "finish_reason": null, "logprobs": logprobs}])
            }
            (true, Some(f)) => {
                json!([{"index": 0, "delta": {}, "finish_reason": f, "logprobs": logprobs}])
            }
            (false, f) => {
                json!([{"index": 0, "text": text, "finish_reason": f, "logprobs": logprobs}])
            }
        }
    }
}

/// Runs a completion: the whole answer as one object, or its chunks as they are decoded.
async fn answer(state: &AppState, c: Completion) -> Result<Response, ApiError> {
    let ids = AnswerIds::new(&c);
    if c.stream {
        return Ok(answer_stream(state, c, ids));
    }
    let Completion {
        served,
        prompt,
        sampling,
        constraint,
        logprobs,
        ticket,
        ..
    } = c;
    // a client that hangs up drops this future, and its request leaves the batch
    let result = state
        .models
        .generate(
            served,
            prompt,
            sampling,
            constraint,
            ticket,
            Box::new(|_, _| true),
        )
        .await
        .map_err(generation_failed)?;
    let (text, finish) = (result.text, result.finish.as_str());
    let logprobs = logprobs.map_or(Value::Null, |mut l| l.render(&result.logprobs));
    let (object, choice) = if ids.chat {
        let message = json!({"role": "assistant", "content": text, "refusal": null});
        let choice =
            json!({"index": 0, "message": message, "finish_reason": finish, "logprobs": logprobs});
        ("chat.completion", choice)
    } else {
        let choice =
            json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs});
        ("text_completion", choice)
    };
    Ok(Json(json!({
        "id": ids.id, "object": object, "created": ids.created, "model": ids.model,
        "choices": [choice], "usage": usage(result.prompt_tokens, result.tokens.len()),
        "system_fingerprint": null,
    }))
    .into_response())
}

/// The answer's chunks as Server-Sent Events while it is decoded, ending with `[DONE]`; a client
/// that goes away stops the decode. The chunks queue without bound (at most `max_tokens` of
/// them): a client that reads slowly never holds up the batch its answer is decoded in.
fn answer_stream(state: &AppState, c: Completion, ids: AnswerIds) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let models = state.models.clone();
    let Completion {
        served,
        prompt,
        sampling,
        constraint,
        mut logprobs,
        include_usage,
        ticket,
        ..
    } = c;
    tokio::spawn(async move {
        if ids.chat {
            let first = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null, "logprobs": null}]);
            // a send fails only when the client went away: nothing more to tell it
            tx.send(ids.chunk(first, Value::Null)).ok();
        }
        let (sender, of) = (tx.clone(), ids.clone());
        let on_text = Box::new(move |text: &str, tokens: &[TokenLogprob]| {
            let lp = logprobs.as_mut().map_or(Value::Null, |l| l.render(tokens));
            let piece = of.chunk(of.delta(text, lp, None), Value::Null);
            sender.send(piece).is_ok()
        });
        let result = models
            .generate(served, prompt, sampling, constraint, ticket, on_text)
            .await
            .map_err(|e| e.to_string());
        let last = match result {
            Ok(g) => {
                let end = ids.delta("", Value::Null, Some(g.finish.as_str()));
                tx.send(ids.chunk(end, Value::Null)).ok();
                let usage = usage(g.prompt_tokens, g.tokens.len());
                include_usage.then(|| ids.chunk(json!([]), usage))
            }
            Err(e) => Some(
                json!({"error": {"message": e, "type": "server_error", "code": "generation_failed", "param": null}}),
            ),
        };
        if let Some(last) = last {
            tx.send(last).ok();
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
    Sse::new(events).into_response()
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = CompletionRequest::parse(&headers, &body?, "a chat request")?;
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
    let req = CompletionRequest::parse(&headers, &body?, "a completion request")?;
    let c = completion(&state, &owner, &req, false).await?;
    answer(&state, c).await
}

/// `GET /v1/models`: the fine-tuned models of the caller's succeeded jobs, newest first, the
/// adapters it brought (with their base as `parent`, as vLLM lists them), and the bases: the
/// operator's `--models` catalogue and those the caller's models are over.
pub async fn models(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
) -> Result<Json<Value>, ApiError> {
    let rows = state
        .db
        .list_jobs(owner.as_deref(), Some(JobStatus::Succeeded), None, 100)
        .await?;
    let mut data = Vec::new();
    // the operator's catalogue first, by name
    let mut bases: Vec<String> = state
        .config
        .catalogue()
        .iter()
        .map(|(name, _)| name.clone())
        .collect();
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
    for adapter in state.db.list_adapters(owner.as_deref(), 100).await? {
        data.push(json!({
            "id": adapter.name,
            "object": "model",
            "created": crate::job::unix_seconds(&adapter.created_at),
            "owned_by": format!("org-{}", adapter.owner.as_deref().unwrap_or("qtune")),
            "parent": adapter.base_model,
        }));
        if !bases.contains(&adapter.base_model) {
            bases.push(adapter.base_model);
        }
    }
    for base in bases {
        data.push(json!({"id": base, "object": "model", "created": 0, "owned_by": "qtune"}));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

/// The largest chat or completion request: long conversations, far more than any context
/// window here holds, and still bounded.
pub(super) const BODY_LIMIT: usize = 8 << 20;

pub(super) fn routes() -> axum::Router<AppState> {
    use axum::routing::{get, post};
    let limit = axum::extract::DefaultBodyLimit::max(BODY_LIMIT);
    axum::Router::new()
        .route(
            "/v1/chat/completions",
            post(chat_completions).route_layer(limit),
        )
        .route("/v1/completions", post(completions).route_layer(limit))
        .route("/v1/models", get(models))
}
