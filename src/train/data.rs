//! Datasets: JSON Lines records → token ids with a label mask → padded batches.
//!
//! Each record becomes text segments marked "label" or not; the text is tokenized once with byte
//! offsets and a token is a label when it starts inside a label segment. Chat records go through
//! the model's chat template; the answer span of each assistant turn is found by rendering the
//! conversation up to that turn, so the closing end-of-turn token is a label and the model learns
//! to stop.

use std::path::PathBuf;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::Serialize;
use serde_json::Value;

use super::tokenizer::{Message, TextTokenizer};
pub(crate) use crate::kernels::attention::Packing;
use crate::spec::{DatasetFormat, JobSpec};
use crate::train::{Error, Result};

/// One tokenized example. `labels[i]` says whether token `i` is predicted (carries loss).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<bool>,
}

impl Example {
    pub fn label_count(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l).count()
    }
}

/// What the data step did with a file; printed and reported, never silent.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct DataReport {
    pub path: String,
    pub format: String,
    pub records: usize,
    pub examples: usize,
    /// Examples cut to max_seq_len (kept if labels remain).
    pub truncated: usize,
    /// Examples dropped because truncation left no label token.
    pub dropped_no_labels: usize,
    pub tokens: usize,
    pub label_tokens: usize,
}

const ALPACA_PROMPT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n";
const ALPACA_PROMPT_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n";

fn detect(record: &serde_json::Map<String, Value>) -> Option<DatasetFormat> {
    let has = |k: &str| record.contains_key(k);
    if has("preferred_output") || has("non_preferred_output") {
        Some(DatasetFormat::Preference)
    } else if has("chosen") && has("rejected") {
        Some(DatasetFormat::ChosenRejected)
    } else if has("messages") {
        Some(DatasetFormat::Messages)
    } else if has("conversations") {
        Some(DatasetFormat::Sharegpt)
    } else if has("instruction") && has("output") {
        Some(DatasetFormat::Alpaca)
    } else if has("prompt") && has("completion") {
        Some(DatasetFormat::PromptCompletion)
    } else if has("text") {
        Some(DatasetFormat::Text)
    } else {
        None
    }
}

/// A dataset file the engine reads, and the name its messages give it (what the job named:
/// a URL or an upload id, rather than where the service put the file).
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetFile {
    pub path: PathBuf,
    pub name: String,
}

impl DatasetFile {
    /// A dataset reference the engine can read itself: a local path or a `file://` URL.
    pub fn local(url: &str) -> Result<DatasetFile> {
        if url.starts_with("http://") || url.starts_with("https://") {
            return Err(Error::Data(format!(
                "{url}: the engine reads local files; remote datasets are fetched by the service"
            )));
        }
        Ok(DatasetFile {
            path: PathBuf::from(url.strip_prefix("file://").unwrap_or(url)),
            name: url.to_string(),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Datasets {
    pub train: DatasetFile,
    pub validation: Option<DatasetFile>,
}

impl Datasets {
    /// The spec's own `dataset.url` and `validation_url`, read as local files.
    pub(crate) fn from_spec(spec: &JobSpec) -> Result<Datasets> {
        Ok(Datasets {
            train: DatasetFile::local(&spec.dataset.url)?,
            validation: spec
                .dataset
                .validation_url
                .as_deref()
                .map(DatasetFile::local)
                .transpose()?,
        })
    }
}

/// What the engine reports once the data is tokenized (the service's `data` event).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct DataSummary {
    pub train: DataReport,
    pub validation: Option<DataReport>,
    pub total_steps: u64,
    pub(crate) trainable_parameters: usize,
}

/// The largest record (one JSONL line) a run reads unless told otherwise: 1 MiB, about 250k
/// tokens of text. Tokenizing takes a few hundred bytes of memory per byte of record, so one
/// unbounded record could take the host's memory from every other job.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1 << 20;

/// One JSONL line (without its newline, or with it: it is trimmed here) as a record: `None`
/// for a blank line, else the JSON object, after checking its size, its encoding and its JSON,
/// and detecting the format from the first record when it is `Auto`. Errors name `shown` and
/// the line, and never quote the data.
pub(crate) fn parse_line(
    raw: &mut Vec<u8>,
    shown: &str,
    line_no: usize,
    format: &mut DatasetFormat,
    max_record_bytes: usize,
) -> Result<Option<serde_json::Map<String, Value>>> {
    if raw.last() == Some(&b'\n') {
        raw.pop();
    }
    if raw.last() == Some(&b'\r') {
        raw.pop();
    }
    let at = |msg: String| Error::Data(format!("{shown} line {line_no}: {msg}"));
    if raw.len() > max_record_bytes {
        return Err(at(format!(
            "the record is over {max_record_bytes} bytes, the most one record may have; split it \
             or shorten it"
        )));
    }
    let line = std::str::from_utf8(raw).map_err(|_| at("not UTF-8 text".into()))?;
    if line.trim().is_empty() {
        return Ok(None);
    }
    // serde_json's messages give a position, never the text
    let value: Value = serde_json::from_str(line).map_err(|e| at(format!("invalid JSON: {e}")))?;
    let Value::Object(record) = value else {
        return Err(at("expected a JSON object".into()));
    };
    if *format == DatasetFormat::Auto {
        // the record's own keys are not quoted: a fetched file may hold what its owner did not
        // mean to show (the fields of a credentials document, say)
        *format = detect(&record).ok_or_else(|| {
            at(format!(
                "cannot detect the dataset format from the record's {} fields; expected \
                 messages, conversations, instruction/output, prompt/completion, text, \
                 input/preferred_output/non_preferred_output or chosen/rejected (or set \
                 dataset.format)",
                record.len()
            ))
        })?;
    }
    Ok(Some(record))
}

/// Checks a record's shape for `format` without a tokenizer (what can be told before a model is
/// loaded: fields, types, roles, weights); rendering and tokenizing come at training.
pub(crate) fn check_record(
    record: &serde_json::Map<String, Value>,
    format: DatasetFormat,
) -> Result<()> {
    match format {
        DatasetFormat::Messages | DatasetFormat::Sharegpt => {
            chat_messages(record, format)?;
            match record.get("tools") {
                None | Some(Value::Null) | Some(Value::Array(_)) => Ok(()),
                Some(other) => Err(Error::Data(format!(
                    "field \"tools\" must be an array, got {}",
                    type_name(other)
                ))),
            }
        }
        _ => plain_segments(record, format).map(|_| ()),
    }
}

/// Reads, checks and tokenizes a JSONL file, one record at a time (the file is never held
/// whole). Any malformed line is an error naming the file (by the name the job gave it) and the
/// line; so is a record over `max_record_bytes`. Errors never quote the data.
pub fn load_jsonl(
    file: &DatasetFile,
    format: DatasetFormat,
    tok: &TextTokenizer,
    max_seq_len: usize,
    train_on_inputs: bool,
    max_record_bytes: usize,
) -> Result<(Vec<Example>, DataReport)> {
    let mut examples = Vec::new();
    let mut report = read_records(file, format, max_record_bytes, |record, format, report| {
        if format.is_preference() {
            return Err(Error::Data(format!(
                "the records are preference pairs ({}); train them with method dpo or orpo",
                format.as_str()
            )));
        }
        let segments = segments(&record, format, tok)?;
        let mut ex = tokenize(&segments, format, tok, train_on_inputs)?;
        if ex.ids.len() > max_seq_len {
            ex.ids.truncate(max_seq_len);
            ex.labels.truncate(max_seq_len);
            report.truncated += 1;
        }
        if ex.label_count() == 0 {
            report.dropped_no_labels += 1;
            return Ok(());
        }
        report.tokens += ex.ids.len();
        report.label_tokens += ex.label_count();
        examples.push(ex);
        Ok(())
    })?;
    report.examples = examples.len();
    if examples.is_empty() {
        return Err(Error::Data(format!(
            "{}: none of its {} records has a label token left within max_seq_len={max_seq_len} \
             ({} truncated); raise max_seq_len or shorten the examples",
            file.name, report.records, report.truncated
        )));
    }
    Ok((examples, report))
}

/// Reads a JSONL file one record at a time and hands each (with the format, detected from the
/// first record when `Auto`) to `take`, which counts what it keeps in the report. An error of
/// `take` is given the file's name and the line; so is a malformed line or an oversized record.
pub(crate) fn read_records(
    file: &DatasetFile,
    format: DatasetFormat,
    max_record_bytes: usize,
    mut take: impl FnMut(serde_json::Map<String, Value>, DatasetFormat, &mut DataReport) -> Result<()>,
) -> Result<DataReport> {
    use std::io::{BufRead, Read};
    let shown = file.name.clone();
    let opened = std::fs::File::open(&file.path).map_err(|e| Error::io(&shown, e))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, opened);
    let mut format = format;
    let mut report = DataReport {
        path: shown.clone(),
        ..Default::default()
    };
    let mut raw = Vec::new();
    let mut line_no = 0usize;
    loop {
        raw.clear();
        // one byte past the limit (plus the newline) tells an oversized record from a full one
        let read = (&mut reader)
            .take(max_record_bytes as u64 + 2)
            .read_until(b'\n', &mut raw)
            .map_err(|e| Error::io(&shown, e))?;
        if read == 0 {
            break;
        }
        line_no += 1;
        let Some(record) = parse_line(&mut raw, &shown, line_no, &mut format, max_record_bytes)?
        else {
            continue;
        };
        report.records += 1;
        take(record, format, &mut report).map_err(|e| match e {
            Error::Data(m) => Error::Data(format!("{shown} line {line_no}: {m}")),
            other => Error::Data(format!("{shown} line {line_no}: {other}")),
        })?;
    }
    report.format = format.as_str().to_string();
    if report.records == 0 {
        return Err(Error::Data(format!("{shown} is empty: no records")));
    }
    Ok(report)
}

/// A piece of an example's text and whether its tokens carry loss.
type Segment = (String, bool);

fn field<'a>(
    record: &'a serde_json::Map<String, Value>,
    key: &str,
    format: DatasetFormat,
) -> Result<&'a str> {
    match record.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(Error::Data(format!(
            "field {key:?} must be a string, got {}",
            type_name(other)
        ))),
        None => Err(Error::Data(format!(
            "missing field {key:?} (format {})",
            format.as_str()
        ))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn segments(
    record: &serde_json::Map<String, Value>,
    format: DatasetFormat,
    tok: &TextTokenizer,
) -> Result<Vec<Segment>> {
    match format {
        DatasetFormat::Messages | DatasetFormat::Sharegpt => {
            let (messages, trained) = chat_messages(record, format)?;
            let tools = match record.get("tools") {
                None | Some(Value::Null) => None,
                Some(t @ Value::Array(_)) if format == DatasetFormat::Messages => {
                    if !tok.template_takes_tools() {
                        return Err(Error::Data(
                            "the record has tools, but the model's chat template does not render \
                             tools; remove them or use a model whose template takes tools"
                                .into(),
                        ));
                    }
                    Some(t)
                }
                Some(other) => {
                    return Err(Error::Data(format!(
                        "field \"tools\" must be an array, got {}",
                        type_name(other)
                    )))
                }
            };
            chat_segments(&messages, &trained, tools, tok)
        }
        _ => plain_segments(record, format),
    }
}

/// The segments of the formats that need no chat template.
fn plain_segments(
    record: &serde_json::Map<String, Value>,
    format: DatasetFormat,
) -> Result<Vec<Segment>> {
    match format {
        DatasetFormat::Text => Ok(vec![(field(record, "text", format)?.to_string(), true)]),
        DatasetFormat::PromptCompletion => Ok(vec![
            (field(record, "prompt", format)?.to_string(), false),
            (field(record, "completion", format)?.to_string(), true),
        ]),
        DatasetFormat::Alpaca => {
            let instruction = field(record, "instruction", format)?;
            let input = match record.get("input") {
                None | Some(Value::Null) => "",
                Some(Value::String(s)) => s,
                Some(other) => {
                    return Err(Error::Data(format!(
                        "field \"input\" must be a string, got {}",
                        type_name(other)
                    )))
                }
            };
            let prompt = if input.is_empty() {
                format!("{ALPACA_PROMPT}{instruction}\n\n### Response:\n")
            } else {
                format!(
                    "{ALPACA_PROMPT_INPUT}{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
                )
            };
            Ok(vec![
                (prompt, false),
                (field(record, "output", format)?.to_string(), true),
            ])
        }
        DatasetFormat::Messages | DatasetFormat::Sharegpt | DatasetFormat::Auto => {
            unreachable!("chat formats are rendered by segments; auto is resolved before")
        }
        DatasetFormat::Preference | DatasetFormat::ChosenRejected => Err(Error::Data(format!(
            "the records are preference pairs ({}); train them with method dpo or orpo",
            format.as_str()
        ))),
    }
}

/// A record's chat turns, and for each whether it is trained on: an assistant turn unless its
/// OpenAI `weight` is 0.
fn chat_messages(
    record: &serde_json::Map<String, Value>,
    format: DatasetFormat,
) -> Result<(Vec<Message>, Vec<bool>)> {
    let key = match format {
        DatasetFormat::Messages => "messages",
        _ => "conversations",
    };
    let list = match record.get(key) {
        Some(Value::Array(l)) => l,
        Some(other) => {
            return Err(Error::Data(format!(
                "field {key:?} must be an array, got {}",
                type_name(other)
            )))
        }
        None => {
            return Err(Error::Data(format!(
                "missing field {key:?} (format {})",
                format.as_str()
            )))
        }
    };
    let mut out = Vec::with_capacity(list.len());
    let mut trained = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let (message, weight) = parse_message(m, &format!("{key}[{i}]"), format)?;
        trained.push(message.role == "assistant" && weight == 1);
        out.push(message);
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err(Error::Data(format!(
            "{key} has no assistant turn to learn from"
        )));
    }
    if !trained.iter().any(|&t| t) {
        return Err(Error::Data(format!(
            "every assistant turn of {key} has weight 0: nothing to learn from"
        )));
    }
    Ok((out, trained))
}

/// One chat message of a record (`at` names it in errors, e.g. `messages[2]`), with its OpenAI
/// `weight` (0 or 1; 1 when absent).
pub(crate) fn parse_message(m: &Value, at: &str, format: DatasetFormat) -> Result<(Message, u8)> {
    let (role_key, content_key) = match format {
        DatasetFormat::Sharegpt => ("from", "value"),
        _ => ("role", "content"),
    };
    let obj = m
        .as_object()
        .ok_or_else(|| Error::Data(format!("{at} must be an object")))?;
    let role = match obj.get(role_key) {
        Some(Value::String(s)) => s.as_str(),
        _ => {
            return Err(Error::Data(format!(
                "{at}: missing string field {role_key:?}"
            )))
        }
    };
    let role = match (format, role) {
        (DatasetFormat::Sharegpt, "human" | "user") => "user",
        (DatasetFormat::Sharegpt, "gpt" | "assistant" | "chatgpt") => "assistant",
        (_, "system" | "user" | "assistant") => role,
        // OpenAI's developer messages are what chat templates call system messages
        (f, "developer") if f != DatasetFormat::Sharegpt => "system",
        (f, "tool") if f != DatasetFormat::Sharegpt => "tool",
        // not quoted: error messages never repeat the data
        (_, _) => {
            return Err(Error::Data(format!(
                "{at}: unknown role (expected system, developer, user, assistant or tool)"
            )))
        }
    };
    let tool_calls = match obj.get("tool_calls") {
        None | Some(Value::Null) => None,
        Some(calls @ Value::Array(_)) if role == "assistant" => Some(calls.clone()),
        Some(_) => {
            return Err(Error::Data(format!(
                "{at}.tool_calls: only assistant messages carry tool calls, as an array"
            )))
        }
    };
    let content = match obj.get(content_key) {
        Some(Value::String(s)) => s.clone(),
        // an assistant turn that only calls tools has no text
        None | Some(Value::Null) if tool_calls.is_some() => String::new(),
        _ => {
            return Err(Error::Data(format!(
                "{at}: missing string field {content_key:?}"
            )))
        }
    };
    let weight = match obj.get("weight") {
        None | Some(Value::Null) => 1,
        Some(_) if role != "assistant" => {
            return Err(Error::Data(format!(
                "{at}.weight: only assistant messages have a weight"
            )));
        }
        Some(w) => match w.as_f64() {
            Some(v) if v == 0.0 || v == 1.0 => v as u8,
            _ => return Err(Error::Data(format!("{at}.weight: must be 0 or 1"))),
        },
    };
    let tool_call_id = match obj.get("tool_call_id") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let message = Message {
        role: role.to_string(),
        content,
        tool_calls,
        tool_call_id,
    };
    Ok((message, weight))
}

/// Splits a rendered conversation into prompt text and assistant answers (each answer ending
/// with the template's end-of-turn token, trailing whitespace excluded).
fn chat_segments(
    messages: &[Message],
    trained: &[bool],
    tools: Option<&Value>,
    tok: &TextTokenizer,
) -> Result<Vec<Segment>> {
    let full = tok.render_chat_with_tools(messages, tools, false)?;
    let mut segments = Vec::new();
    let mut cursor = 0;
    for (i, m) in messages.iter().enumerate() {
        // an assistant turn with weight 0 stays in the prompt text
        if m.role != "assistant" || !trained[i] {
            continue;
        }
        let before = tok.render_chat_with_tools(&messages[..i], tools, true)?;
        let through = tok.render_chat_with_tools(&messages[..=i], tools, false)?;
        if !full.starts_with(&through) || !through.starts_with(&before) || before.len() < cursor {
            return Err(Error::Tokenizer(
                "the chat template does not render conversations incrementally (a prefix of the \
                 conversation does not render to a prefix of the text), so answer tokens cannot \
                 be located"
                    .into(),
            ));
        }
        let answer_end = through.trim_end().len().max(before.len());
        segments.push((full[cursor..before.len()].to_string(), false));
        segments.push((full[before.len()..answer_end].to_string(), true));
        cursor = answer_end;
    }
    if cursor < full.len() {
        segments.push((full[cursor..].to_string(), false));
    }
    Ok(segments)
}

fn tokenize(
    segments: &[Segment],
    format: DatasetFormat,
    tok: &TextTokenizer,
    train_on_inputs: bool,
) -> Result<Example> {
    let text: String = segments.iter().map(|(s, _)| s.as_str()).collect();
    let mut spans = Vec::new();
    let mut pos = 0;
    for (s, label) in segments {
        if *label {
            spans.push((pos, pos + s.len()));
        }
        pos += s.len();
    }
    let chat = matches!(format, DatasetFormat::Messages | DatasetFormat::Sharegpt);
    // Chat templates write their own BOS/EOS; the raw formats get the tokenizer's special tokens
    // and an explicit EOS after the answer.
    let (mut ids, offsets) = tok.encode_with_offsets(&text, !chat)?;
    let mut labels: Vec<bool> = offsets
        .iter()
        .map(|&(start, end)| {
            train_on_inputs || (end > start && spans.iter().any(|&(a, b)| start >= a && start < b))
        })
        .collect();
    if !chat {
        let eos = tok.eos_id.ok_or_else(|| {
            Error::Tokenizer("the tokenizer has no EOS token to close answers with".into())
        })?;
        ids.push(eos);
        labels.push(true);
    }
    if let Some(first) = labels.first_mut() {
        *first = false; // nothing predicts the first token
    }
    Ok(Example { ids, labels })
}

/// A padded micro-batch ready for the model.
pub struct Batch {
    /// (b, t) input ids, right-padded.
    pub ids: Tensor,
    /// Indices into the flattened (b·t) positions whose next token is a label.
    pub positions: Tensor,
    /// The label tokens at those positions.
    pub targets: Tensor,
    pub label_tokens: usize,
    /// Real (non-padding) input tokens.
    pub tokens: usize,
    /// For each label position, in order: the example it belongs to (its index in the slice the
    /// batch was made from) and the index of the predicted token in that example. What a loss
    /// over whole sequences (DPO, ORPO) sums by.
    pub(crate) label_rows: Vec<(u32, u32)>,
    /// Set when rows hold several examples ([`make_packed_batch`]): for each position of `ids`
    /// (row-major), the column where its example starts in its row, and the span it hides, if
    /// any. Attention stays within an example and RoPE positions count from its start, so each
    /// example computes what it would alone in a row.
    pub(crate) packing: Option<Arc<Packing>>,
}

/// A run of positions packed whole into one row ([`make_packed_units`]): its input ids, the
/// span each position hides (see [`Packing`]; empty: none), and its labels as `(position,
/// target, tag)`, the tag going to [`Batch::label_rows`] beside the unit's index.
pub(crate) struct Unit {
    pub ids: Vec<u32>,
    pub hidden: Vec<[u32; 2]>,
    pub labels: Vec<(u32, u32, u32)>,
}

pub fn make_batch(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Batch> {
    let t = examples
        .iter()
        .map(|e| e.ids.len() - 1)
        .max()
        .unwrap_or(0)
        .max(1);
    let b = examples.len();
    let mut ids = vec![pad_id; b * t];
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    let mut label_rows = Vec::new();
    let mut tokens = 0;
    for (bi, ex) in examples.iter().enumerate() {
        let n = ex.ids.len() - 1;
        ids[bi * t..bi * t + n].copy_from_slice(&ex.ids[..n]);
        tokens += n;
        for p in 0..n {
            if ex.labels[p + 1] {
                positions.push((bi * t + p) as u32);
                targets.push(ex.ids[p + 1]);
                label_rows.push((bi as u32, (p + 1) as u32));
            }
        }
    }
    let label_tokens = targets.len();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        positions: Tensor::from_vec(positions, label_tokens, device)?,
        targets: Tensor::from_vec(targets, label_tokens, device)?,
        label_tokens,
        tokens,
        label_rows,
        packing: None,
    })
}

/// The examples packed into rows (first fit, longest first), each example whole in one row,
/// attention and positions kept within it. The row width is chosen for the least padding: as wide
/// as the longest example leaves most rows part empty (about 15 % of a batch of 8 mixed-length
/// chat examples), so wider rows are tried too, as long as rows × width² (the attention's score
/// matrices) stays within what the examples one per row would need; the padded tokens and the
/// attention memory are then never more than without packing. Labels are unchanged.
pub fn make_packed_batch(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Batch> {
    let units: Vec<Unit> = examples
        .iter()
        .map(|ex| {
            let n = ex.ids.len() - 1;
            Unit {
                ids: ex.ids[..n].to_vec(),
                hidden: Vec::new(),
                // tagged with the predicted token's index, as make_batch's label rows
                labels: (0..n)
                    .filter(|&p| ex.labels[p + 1])
                    .map(|p| (p as u32, ex.ids[p + 1], (p + 1) as u32))
                    .collect(),
            }
        })
        .collect();
    make_packed_units(&units, pad_id, device)
}

/// [`make_packed_batch`] of units: each whole in one row, its labels tagged in
/// [`Batch::label_rows`] as `(unit index, tag)`.
pub(crate) fn make_packed_units(units: &[Unit], pad_id: u32, device: &Device) -> Result<Batch> {
    let lengths: Vec<usize> = units.iter().map(|u| u.ids.len()).collect();
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let (width, rows) = pack_rows(&lengths, &order);
    let b = rows.len().max(1);
    let mut ids = vec![pad_id; b * width];
    let mut starts = vec![0u32; b * width];
    let mut hidden = match units.iter().any(|u| !u.hidden.is_empty()) {
        true => vec![[0u32; 2]; b * width],
        false => Vec::new(),
    };
    let (mut positions, mut targets, mut tokens) = (Vec::new(), Vec::new(), 0);
    let mut label_rows = Vec::new();
    for (row, (used, members)) in rows.iter().enumerate() {
        let mut col = 0;
        for &i in members {
            let unit = &units[i];
            let n = unit.ids.len();
            let at = row * width + col;
            ids[at..at + n].copy_from_slice(&unit.ids);
            starts[at..at + n].fill(col as u32);
            if !unit.hidden.is_empty() {
                hidden[at..at + n].copy_from_slice(&unit.hidden);
            }
            for &(p, target, tag) in &unit.labels {
                positions.push(at as u32 + p);
                targets.push(target);
                label_rows.push((i as u32, tag));
            }
            col += n;
            tokens += n;
        }
        // the padding after the last example is a run of its own
        starts[row * width + used..(row + 1) * width].fill(*used as u32);
    }
    let label_tokens = targets.len();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, width), device)?,
        positions: Tensor::from_vec(positions, label_tokens, device)?,
        targets: Tensor::from_vec(targets, label_tokens, device)?,
        label_tokens,
        tokens,
        label_rows,
        packing: Some(Arc::new(Packing { starts, hidden })),
    })
}

/// `(width, rows)` for [`make_packed_batch`]: each row as `(used columns, examples in column
/// order)`. For each row count below that of the narrowest packing, the narrowest width that
/// fits the examples in that many rows (bisected: first fit is all but monotone in the width, and
/// the search only ever settles on a width that fits), kept if it pads less (or as little, with
/// fewer attention scores).
fn pack_rows(lengths: &[usize], order: &[usize]) -> (usize, Vec<(usize, Vec<usize>)>) {
    let longest = order.first().map_or(0, |&i| lengths[i]).max(1);
    let total: usize = lengths.iter().sum();
    let score_budget = lengths.len().max(1) * longest * longest;
    let mut best = (longest, first_fit(lengths, order, longest));
    for k in 1..best.1.len() {
        let fits = |w: usize| first_fit(lengths, order, w).len() <= k;
        let (mut lo, mut hi) = (longest.max(total.div_ceil(k)), (score_budget / k).isqrt());
        // k rows pad at least k·lo − total: no narrower search can beat the best already found
        if lo > hi || k * lo > best.1.len() * best.0 || !fits(hi) {
            continue;
        }
        while lo < hi {
            let mid = (lo + hi) / 2;
            if fits(mid) {
                hi = mid
            } else {
                lo = mid + 1
            }
        }
        let rows = first_fit(lengths, order, hi);
        // the least padding; between equals, the fewer attention scores
        let cost = |w: usize, n: usize| (n * w, n * w * w);
        if cost(hi, rows.len()) < cost(best.0, best.1.len()) {
            best = (hi, rows);
        }
    }
    best
}

/// Examples (in `order`) placed each in the first row of `width` columns with room for it.
fn first_fit(lengths: &[usize], order: &[usize], width: usize) -> Vec<(usize, Vec<usize>)> {
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
    for &i in order {
        let n = lengths[i];
        match rows.iter_mut().find(|(used, _)| used + n <= width) {
            Some((used, members)) => {
                *used += n;
                members.push(i);
            }
            None => rows.push((n, vec![i])),
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn examples(lengths: &[usize]) -> Vec<Example> {
        lengths
            .iter()
            .enumerate()
            .map(|(e, &n)| Example {
                // distinct ids per example so that each can be found again in the rows
                ids: (0..=n as u32).map(|i| 1000 * (e as u32 + 1) + i).collect(),
                labels: (0..=n).map(|i| i % 3 != 0).collect(),
            })
            .collect()
    }

    /// Packs `lengths`, checks every example lies whole in one row with its start and labels,
    /// and returns `(rows, width)`.
    fn packed(lengths: &[usize]) -> (usize, usize) {
        let examples = examples(lengths);
        let refs: Vec<&Example> = examples.iter().collect();
        let batch = make_packed_batch(&refs, 0, &Device::Cpu).unwrap();
        let (rows, width) = batch.ids.dims2().unwrap();
        let ids: Vec<u32> = batch.ids.flatten_all().unwrap().to_vec1().unwrap();
        let starts = batch.packing.unwrap().starts.clone();
        let positions: Vec<u32> = batch.positions.to_vec1().unwrap();
        for (e, ex) in examples.iter().enumerate() {
            let n = ex.ids.len() - 1;
            let at = ids.iter().position(|&id| id == ex.ids[0]).unwrap();
            assert_eq!(&ids[at..at + n], &ex.ids[..n], "example {e} is whole");
            assert!(at % width + n <= width, "example {e} stays in its row");
            assert!(starts[at..at + n].iter().all(|&s| s as usize == at % width));
            let labelled = (0..n).filter(|&p| ex.labels[p + 1]).count();
            let found = positions
                .iter()
                .filter(|&&p| (at..at + n).contains(&(p as usize)))
                .count();
            assert_eq!(found, labelled, "example {e}'s labels");
        }
        assert_eq!(batch.tokens, lengths.iter().sum::<usize>());
        (rows, width)
    }

    #[test]
    fn packed_rows_pad_less_than_rows_as_wide_as_the_longest_example() {
        // as wide as the longest (200): 200 | 50 50 50 50 | 50 50, 600 positions for 500 tokens;
        // 250 wide: 200 50 | 50 50 50 50 50, no padding
        assert_eq!(packed(&[50, 200, 50, 50, 50, 50, 50]), (2, 250));
        // rows wider than the longest only within the scores of one example per row (4 × 100²
        // here): 100 | 60 60 | 60 at 120 wide would need 3 × 120², 100 60 | 60 60 2 × 160²
        assert_eq!(packed(&[100, 60, 60, 60]), (4, 100));

        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (mut tokens, mut padded, mut narrow) = (0, 0, 0);
        for _ in 0..200 {
            // chat-like lengths: mostly short, now and then a long one
            let lengths: Vec<usize> = (0..8)
                .map(|_| match rng.random_range(0..10) {
                    0 => rng.random_range(200..512),
                    _ => rng.random_range(20..200),
                })
                .collect();
            let (rows, width) = packed(&lengths);
            let longest = *lengths.iter().max().unwrap();
            let mut order: Vec<usize> = (0..lengths.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            let at_longest = first_fit(&lengths, &order, longest).len() * longest;
            assert!(rows * width <= at_longest, "{lengths:?}: {rows} × {width}");
            assert!(rows * width * width <= lengths.len() * longest * longest);
            tokens += lengths.iter().sum::<usize>();
            padded += rows * width;
            narrow += at_longest;
        }
        let (fill, narrow_fill) = (tokens as f64 / padded as f64, tokens as f64 / narrow as f64);
        assert!(
            fill > narrow_fill + 0.05 && fill > 0.95,
            "fill {fill:.3}, rows as wide as the longest example {narrow_fill:.3}"
        );
    }
}
