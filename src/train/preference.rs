//! Preference training: chosen/rejected pairs → tokenized pairs → DPO or ORPO losses.
//!
//! Data: OpenAI's preference records (`input`, `preferred_output`, `non_preferred_output`) and
//! TRL's (`prompt`?, `chosen`, `rejected`, strings or message lists), tokenized as TRL's
//! `DPOTrainer` tokenizes them: the prompt (with the generation prompt, for conversations) and
//! prompt + answer each on their own, the answer starting where the two stop agreeing; plain
//! text answers end with the EOS token.
//!
//! Losses (TRL 1.16's meanings): a micro-batch's chosen and rejected sequences run as one packed
//! batch; each answer's log-probability is the sum over its tokens. The loss is a function of
//! those sums, so it is computed here in f64 with its derivative per sequence, and the backward
//! runs once through `Σ w·token_loss` with `w` that derivative spread over each sequence's tokens
//! — the same gradient as autograd through the whole expression, one graph node instead of
//! dozens.

use candle_core::Tensor;
use serde_json::Value;

use super::data::{self, Batch, DataReport, DatasetFile, Example};
use super::error::{Error, Result};
use super::model::{ForwardMode, Llama};
use super::tokenizer::{Message, TextTokenizer};
pub use crate::job::RewardMetrics;
use crate::spec::{DatasetFormat, DpoLoss, Method};

/// One tokenized pair: the prompt followed by each answer; labels on the answers' tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub chosen: Example,
    pub rejected: Example,
    /// Tokens of the shared prompt (both sequences start with them).
    pub prompt_len: usize,
}

impl Pair {
    pub(crate) fn tokens(&self) -> usize {
        self.chosen.ids.len() + self.rejected.ids.len()
    }
}

/// A record's prompt and answers before tokenizing.
enum Parts {
    Chat {
        prompt: Vec<Message>,
        chosen: Vec<Message>,
        rejected: Vec<Message>,
        tools: Option<Value>,
    },
    Text {
        prompt: String,
        chosen: String,
        rejected: String,
    },
}

/// Checks a preference record's shape (what the upload check and the loader share).
pub(crate) fn check_record(
    record: &serde_json::Map<String, Value>,
    format: DatasetFormat,
) -> Result<()> {
    parts(record, format).map(|_| ())
}

fn parts(record: &serde_json::Map<String, Value>, format: DatasetFormat) -> Result<Parts> {
    match format {
        DatasetFormat::Preference => openai_parts(record),
        DatasetFormat::ChosenRejected => trl_parts(record),
        other => Err(Error::Data(format!(
            "format {} holds no preference pairs",
            other.as_str()
        ))),
    }
}

fn missing(key: &str) -> Error {
    Error::Data(format!("missing field {key:?}"))
}

/// A list of chat messages under `at`.
fn messages(v: &Value, at: &str) -> Result<Vec<Message>> {
    let Value::Array(list) = v else {
        return Err(Error::Data(format!("{at} must be an array of messages")));
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            data::parse_message(m, &format!("{at}[{i}]"), DatasetFormat::Messages).map(|m| m.0)
        })
        .collect()
}

/// An answer: one or more assistant messages (tool calls allowed), nothing else.
fn answer(v: &Value, at: &str) -> Result<Vec<Message>> {
    let list = messages(v, at)?;
    if list.is_empty() {
        return Err(Error::Data(format!(
            "{at} must hold the assistant's answer"
        )));
    }
    if let Some(i) = list.iter().position(|m| m.role != "assistant") {
        return Err(Error::Data(format!(
            "{at}[{i}]: an answer is made of assistant messages"
        )));
    }
    Ok(list)
}

fn tools_of(v: Option<&Value>, at: &str) -> Result<Option<Value>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(t @ Value::Array(_)) => Ok(Some(t.clone())),
        Some(_) => Err(Error::Data(format!("{at} must be an array"))),
    }
}

/// OpenAI's `{"input": {"messages", "tools"?}, "preferred_output", "non_preferred_output"}`.
fn openai_parts(record: &serde_json::Map<String, Value>) -> Result<Parts> {
    let input = record.get("input").ok_or_else(|| missing("input"))?;
    let Value::Object(input) = input else {
        return Err(Error::Data("field \"input\" must be an object".into()));
    };
    let prompt = messages(
        input
            .get("messages")
            .ok_or_else(|| missing("input.messages"))?,
        "input.messages",
    )?;
    if prompt.is_empty() {
        return Err(Error::Data("input.messages is empty: no prompt".into()));
    }
    let tools = tools_of(input.get("tools"), "input.tools")?;
    let chosen = answer(
        record
            .get("preferred_output")
            .ok_or_else(|| missing("preferred_output"))?,
        "preferred_output",
    )?;
    let rejected = answer(
        record
            .get("non_preferred_output")
            .ok_or_else(|| missing("non_preferred_output"))?,
        "non_preferred_output",
    )?;
    Ok(Parts::Chat {
        prompt,
        chosen,
        rejected,
        tools,
    })
}

/// TRL's `{"prompt"?, "chosen", "rejected"}`: all strings, or all message lists. Without a
/// prompt, the longest start chosen and rejected share is the prompt (TRL's `extract_prompt`).
fn trl_parts(record: &serde_json::Map<String, Value>) -> Result<Parts> {
    let chosen = record.get("chosen").ok_or_else(|| missing("chosen"))?;
    let rejected = record.get("rejected").ok_or_else(|| missing("rejected"))?;
    let prompt = record.get("prompt").filter(|p| !p.is_null());
    match (prompt, chosen, rejected) {
        (Some(Value::String(p)), Value::String(c), Value::String(r)) => Ok(Parts::Text {
            prompt: p.clone(),
            chosen: c.clone(),
            rejected: r.clone(),
        }),
        (None, Value::String(c), Value::String(r)) => {
            let mut at = c
                .char_indices()
                .zip(r.chars())
                .find(|((_, a), b)| a != b)
                .map_or(c.len().min(r.len()), |((i, _), _)| i);
            // TRL keeps a space that starts both answers with the answers
            if at > 0 && c.as_bytes()[at - 1] == b' ' {
                at -= 1;
            }
            Ok(Parts::Text {
                prompt: c[..at].to_string(),
                chosen: c[at..].to_string(),
                rejected: r[at..].to_string(),
            })
        }
        (None | Some(Value::Array(_)), Value::Array(_), Value::Array(_)) => {
            let tools = tools_of(record.get("tools"), "tools")?;
            let mut c = messages(chosen, "chosen")?;
            let mut r = messages(rejected, "rejected")?;
            let prompt = match prompt {
                Some(p) => messages(p, "prompt")?,
                None => {
                    let shared = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
                    let prompt = c[..shared].to_vec();
                    c.drain(..shared);
                    r.drain(..shared);
                    prompt
                }
            };
            if prompt.is_empty() {
                return Err(Error::Data(
                    "no prompt: give \"prompt\" or start chosen and rejected with the same turns"
                        .into(),
                ));
            }
            for (key, list) in [("chosen", &c), ("rejected", &r)] {
                if list.is_empty() || list.iter().any(|m| m.role != "assistant") {
                    return Err(Error::Data(format!(
                        "{key}: after the prompt, an answer is made of assistant messages"
                    )));
                }
            }
            Ok(Parts::Chat {
                prompt,
                chosen: c,
                rejected: r,
                tools,
            })
        }
        _ => Err(Error::Data(
            "prompt, chosen and rejected must all be strings or all be lists of messages".into(),
        )),
    }
}

/// What tokenizing one record gave.
enum Tokenized {
    Pair(Pair),
    /// Truncation to `max_seq_len` left no answer token in one of the sequences.
    NoAnswer,
}

/// `bos`: a token every sequence must start with (TRL's ORPO puts the tokenizer's BOS first when
/// the prompt does not start with it; its DPO adds only what the tokenizer adds).
fn tokenize(
    parts: Parts,
    tok: &TextTokenizer,
    max_seq_len: usize,
    bos: Option<u32>,
) -> Result<Tokenized> {
    let (prompt, chosen, rejected) = match parts {
        Parts::Chat {
            prompt,
            chosen,
            rejected,
            tools,
        } => {
            if tools.is_some() && !tok.template_takes_tools() {
                return Err(Error::Data(
                    "the record has tools, but the model's chat template does not render tools"
                        .into(),
                ));
            }
            let tools = tools.as_ref();
            let render = |answer: &[Message]| {
                let all: Vec<Message> = prompt.iter().chain(answer).cloned().collect();
                tok.render_chat_with_tools(&all, tools, false)
            };
            let prompt_text = tok.render_chat_with_tools(&prompt, tools, true)?;
            (
                tok.encode(&prompt_text)?,
                tok.encode(&render(&chosen)?)?,
                tok.encode(&render(&rejected)?)?,
            )
        }
        Parts::Text {
            prompt,
            chosen,
            rejected,
        } => {
            let eos = tok.eos_token.clone().ok_or_else(|| {
                Error::Tokenizer("the tokenizer has no EOS token to end answers with".into())
            })?;
            let with_eos = |a: String| if a.ends_with(&eos) { a } else { a + &eos };
            (
                tok.encode_prompt(&prompt)?,
                tok.encode_prompt(&(prompt.clone() + &with_eos(chosen)))?,
                tok.encode_prompt(&(prompt.clone() + &with_eos(rejected)))?,
            )
        }
    };
    let (prompt, chosen, rejected) = match bos {
        Some(b) if prompt.first() != Some(&b) => {
            let first = |ids: Vec<u32>| std::iter::once(b).chain(ids).collect::<Vec<u32>>();
            (first(prompt), first(chosen), first(rejected))
        }
        _ => (prompt, chosen, rejected),
    };
    let shared = |a: &[u32]| prompt.iter().zip(a).take_while(|(x, y)| x == y).count();
    // nothing predicts the first token: an answer starts at 1 at the earliest
    let prompt_len = shared(&chosen).min(shared(&rejected)).max(1);
    let example = |mut ids: Vec<u32>| {
        ids.truncate(max_seq_len);
        let labels = (0..ids.len()).map(|i| i >= prompt_len).collect();
        Example { ids, labels }
    };
    let (chosen, rejected) = (example(chosen), example(rejected));
    if chosen.label_count() == 0 || rejected.label_count() == 0 {
        return Ok(Tokenized::NoAnswer);
    }
    Ok(Tokenized::Pair(Pair {
        chosen,
        rejected,
        prompt_len,
    }))
}

/// Reads, checks and tokenizes a preference JSONL file, one record at a time; errors name the
/// file and the line, never quote the data. Pairs whose answers truncation removed are dropped
/// and counted.
pub fn load_pairs(
    file: &DatasetFile,
    format: DatasetFormat,
    method: &Method,
    tok: &TextTokenizer,
    max_seq_len: usize,
    max_record_bytes: usize,
) -> Result<(Vec<Pair>, DataReport)> {
    let bos = match method {
        Method::Orpo(_) => tok
            .bos_token
            .as_deref()
            .and_then(|b| tok.inner.token_to_id(b)),
        _ => None,
    };
    let mut pairs = Vec::new();
    let mut report =
        data::read_records(file, format, max_record_bytes, |record, format, report| {
            if !format.is_preference() {
                return Err(Error::Data(format!(
                    "the records are {} records, not preference pairs (preference or \
                 chosen_rejected)",
                    format.as_str()
                )));
            }
            match tokenize(parts(&record, format)?, tok, max_seq_len, bos)? {
                Tokenized::Pair(pair) => {
                    report.truncated += (pair.chosen.ids.len() == max_seq_len
                        || pair.rejected.ids.len() == max_seq_len)
                        as usize;
                    report.tokens += pair.tokens();
                    report.label_tokens += pair.chosen.label_count() + pair.rejected.label_count();
                    pairs.push(pair);
                }
                Tokenized::NoAnswer => report.dropped_no_labels += 1,
            }
            Ok(())
        })?;
    report.examples = pairs.len();
    if pairs.is_empty() {
        return Err(Error::Data(format!(
            "{}: none of its {} pairs has an answer token left within max_seq_len={max_seq_len}; \
             raise max_seq_len or shorten the prompts",
            file.name, report.records
        )));
    }
    Ok((pairs, report))
}

// ---------------------------------------------------------------------------------------------
// Losses

/// Sums over pairs, made into [`RewardMetrics`] means at the end.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RewardSums {
    pairs: usize,
    chosen: f64,
    rejected: f64,
    wins: usize,
}

impl RewardSums {
    fn add(&mut self, chosen: f64, rejected: f64) {
        self.pairs += 1;
        self.chosen += chosen;
        self.rejected += rejected;
        self.wins += (chosen > rejected) as usize;
    }

    pub(crate) fn merge(&mut self, other: RewardSums) {
        self.pairs += other.pairs;
        self.chosen += other.chosen;
        self.rejected += other.rejected;
        self.wins += other.wins;
    }

    pub(crate) fn means(&self) -> RewardMetrics {
        let n = self.pairs.max(1) as f64;
        RewardMetrics {
            chosen: self.chosen / n,
            rejected: self.rejected / n,
            margins: (self.chosen - self.rejected) / n,
            accuracies: self.wins as f64 / n,
        }
    }
}

/// Per pair, what the losses read: the answers' summed log-probabilities and their token
/// counts.
#[derive(Debug, Clone, Copy)]
pub struct PairLogps {
    pub chosen: f64,
    pub rejected: f64,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
}

/// The reference's summed log-probabilities of a pair's answers (DPO).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReferenceLogps {
    pub chosen: f64,
    pub rejected: f64,
}

/// A micro-batch's loss (a mean over its pairs, as TRL's), its derivative with respect to each
/// pair's chosen and rejected log-probability sums, and the weight each chosen token's loss
/// gets from the negative log-likelihood term (RPO; ORPO).
pub(crate) struct PairLoss {
    pub loss: f64,
    pub d_chosen: Vec<f64>,
    pub d_rejected: Vec<f64>,
    /// d loss / d (the cross-entropy of a chosen token the NLL term covers).
    pub nll_weight: f64,
    pub rewards: RewardSums,
}

/// Which chosen tokens a method's NLL term averages over: none (plain DPO), the answer's (RPO),
/// or every predicted token of the chosen sequence, prompt included (TRL's ORPO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NllTerm {
    None,
    Answer,
    Sequence,
}

pub(crate) fn nll_term(method: &Method) -> NllTerm {
    match method {
        Method::Dpo(d) if d.rpo_alpha.is_some() => NllTerm::Answer,
        Method::Orpo(_) => NllTerm::Sequence,
        _ => NllTerm::None,
    }
}

fn log_sigmoid(x: f64) -> f64 {
    -((-x).max(0.0) + (-x.abs()).exp().ln_1p())
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log(1 − eˣ)` for x < 0, stable on both sides of −ln 2.
fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

/// The loss of `method` over a micro-batch's pairs. `nll`: the summed cross-entropy of the
/// chosen tokens [`nll_term`] names, and how many they are.
pub(crate) fn pair_loss(
    method: &Method,
    policy: &[PairLogps],
    reference: &[ReferenceLogps],
    nll: (f64, usize),
) -> PairLoss {
    let n = policy.len();
    let mut out = PairLoss {
        loss: 0.0,
        d_chosen: vec![0.0; n],
        d_rejected: vec![0.0; n],
        nll_weight: 0.0,
        rewards: RewardSums::default(),
    };
    let per_pair = 1.0 / n.max(1) as f64;
    let nll_mean = |out: &mut PairLoss, weight: f64| {
        let tokens = nll.1.max(1) as f64;
        out.loss += weight * nll.0 / tokens;
        out.nll_weight = weight / tokens;
    };
    match method {
        Method::Sft => unreachable!("supervised steps do not go through pair losses"),
        Method::Dpo(d) => {
            let beta = d.beta;
            for (i, (p, r)) in policy.iter().zip(reference).enumerate() {
                let (c, j) = (p.chosen - r.chosen, p.rejected - r.rejected);
                out.rewards.add(beta * c, beta * j);
                match d.loss_type {
                    DpoLoss::Sigmoid => {
                        let z = beta * (c - j);
                        let eps = d.label_smoothing;
                        out.loss +=
                            per_pair * (-(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z));
                        let dz = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
                        out.d_chosen[i] = per_pair * dz * beta;
                        out.d_rejected[i] = -per_pair * dz * beta;
                    }
                    DpoLoss::Ipo => {
                        let (nc, nr) = (
                            p.chosen_tokens.max(1) as f64,
                            p.rejected_tokens.max(1) as f64,
                        );
                        let gap = c / nc - j / nr - 1.0 / (2.0 * beta);
                        out.loss += per_pair * gap * gap;
                        out.d_chosen[i] = per_pair * 2.0 * gap / nc;
                        out.d_rejected[i] = -per_pair * 2.0 * gap / nr;
                    }
                }
            }
            if let Some(alpha) = d.rpo_alpha {
                nll_mean(&mut out, alpha);
            }
        }
        Method::Orpo(o) => {
            let beta = o.beta;
            for (i, p) in policy.iter().enumerate() {
                let (nc, nr) = (
                    p.chosen_tokens.max(1) as f64,
                    p.rejected_tokens.max(1) as f64,
                );
                let (ac, ar) = (p.chosen / nc, p.rejected / nr);
                let log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
                out.rewards.add(beta * ac, beta * ar);
                out.loss -= per_pair * beta * log_sigmoid(log_odds);
                let d_odds = -per_pair * beta * sigmoid(-log_odds);
                // d log_odds / d a = 1 / (1 − eᵃ) for the chosen, its negative for the rejected
                out.d_chosen[i] = d_odds / (-ac.exp_m1()) / nc;
                out.d_rejected[i] = -d_odds / (-ar.exp_m1()) / nr;
            }
            nll_mean(&mut out, 1.0);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Forward passes

/// A micro-batch's sequences and what each of its labels is. Packed (the default), each pair is
/// one unit: the prefix its two sequences share (the prompt, and the answers' first tokens where
/// they agree), the chosen answer's rest, then the rejected answer's rest, whose positions hide
/// the chosen answer's; the shared tokens run once, and a label the two answers share enters
/// both. Where a sliding window is narrower than a pair, or unpacked, chosen and rejected are
/// sequences of their own. Under an NLL over the whole chosen sequence (ORPO), the chosen side
/// carries labels on every predicted token.
fn sequences(
    pairs: &[&Pair],
    nll: NllTerm,
    packing: bool,
    pad: u32,
    model: &Llama,
) -> Result<(Batch, Vec<Row>)> {
    let chosen_labels = |p: &Pair| match nll {
        NllTerm::Sequence => vec![true; p.chosen.ids.len()],
        _ => p.chosen.labels.clone(),
    };
    if !packing {
        let chosen: Vec<Example> = pairs
            .iter()
            .map(|p| Example {
                ids: p.chosen.ids.clone(),
                labels: chosen_labels(p),
            })
            .collect();
        let mut refs: Vec<&Example> = chosen.iter().collect();
        refs.extend(pairs.iter().map(|p| &p.rejected));
        let batch = data::make_batch(&refs, pad, &model.device)?;
        let n = pairs.len();
        let rows = batch
            .label_rows
            .iter()
            .map(|&(example, token)| {
                let (pair, chosen) = match (example as usize).checked_sub(n) {
                    None => (example as usize, true),
                    Some(i) => (i, false),
                };
                let answer = token as usize >= pairs[pair].prompt_len;
                Row::new(pair, [chosen, !chosen], answer, nll)
            })
            .collect();
        return Ok((batch, rows));
    }
    let window = model.cfg.narrowest_window();
    let mut packed = PairUnits::default();
    for (k, pair) in pairs.iter().enumerate() {
        let labels = [chosen_labels(pair), pair.rejected.labels.clone()];
        packed.add(k, pair, &labels, nll, window);
    }
    let batch = data::make_packed_units(&packed.units, pad, &model.device)?;
    // in the batch's label order
    let rows = batch
        .label_rows
        .iter()
        .map(|&(_, tag)| packed.rows[tag as usize])
        .collect();
    Ok((batch, rows))
}

/// The packed units of a micro-batch's pairs, and the row of each label they carry (a label's
/// tag is its index here).
#[derive(Default)]
struct PairUnits {
    units: Vec<data::Unit>,
    rows: Vec<Row>,
}

impl PairUnits {
    /// Pair `k` with its chosen and rejected `labels`: one tree, or its two sequences apart when
    /// the tree is longer than `window`.
    fn add(&mut self, k: usize, pair: &Pair, labels: &[Vec<bool>; 2], nll: NllTerm, window: usize) {
        let (c, r) = (&pair.chosen, &pair.rejected);
        let agree = c.ids.iter().zip(&r.ids).take_while(|(a, b)| a == b).count();
        // positions both sequences have in common (each keeps at least its last input)
        let shared = agree.min(c.ids.len() - 1).min(r.ids.len() - 1);
        let answer = |j: usize| j + 1 >= pair.prompt_len;
        let row = |sides: [bool; 2], j: usize| Row::new(k, sides, answer(j), nll);
        if c.ids.len() + r.ids.len() - 2 - shared > window {
            for (side, seq) in [c, r].into_iter().enumerate() {
                let mut unit = data::Unit {
                    ids: seq.ids[..seq.ids.len() - 1].to_vec(),
                    hidden: Vec::new(),
                    labels: Vec::new(),
                };
                for j in (0..seq.ids.len() - 1).filter(|&j| labels[side][j + 1]) {
                    self.label(&mut unit, j, seq.ids[j + 1], row([side == 0, side == 1], j));
                }
                self.units.push(unit);
            }
            return;
        }
        // the chosen sequence's inputs, then the rejected one's after the shared ones
        let branch = c.ids.len() - 1;
        let mut ids = c.ids[..branch].to_vec();
        ids.extend_from_slice(&r.ids[shared..r.ids.len() - 1]);
        let mut hidden = vec![[0u32; 2]; ids.len()];
        hidden[branch..].fill([shared as u32, branch as u32]);
        let mut unit = data::Unit {
            ids,
            hidden,
            labels: Vec::new(),
        };
        // a label both answers have (the same token after the same prefix) is one label
        let both = |j: usize, other: usize| j < shared && j + 1 < agree && labels[other][j + 1];
        for j in (0..branch).filter(|&j| labels[0][j + 1]) {
            self.label(&mut unit, j, c.ids[j + 1], row([true, both(j, 1)], j));
        }
        for j in (0..r.ids.len() - 1).filter(|&j| labels[1][j + 1] && !both(j, 0)) {
            let col = if j < shared { j } else { branch + j - shared };
            self.label(&mut unit, col, r.ids[j + 1], row([false, true], j));
        }
        self.units.push(unit);
    }

    fn label(&mut self, unit: &mut data::Unit, col: usize, target: u32, row: Row) {
        unit.labels
            .push((col as u32, target, self.rows.len() as u32));
        self.rows.push(row);
    }
}

/// What a forward of a micro-batch's pairs measured: each pair's answer log-probabilities, the
/// NLL term's cross-entropy sum and token count.
struct Measured {
    logps: Vec<PairLogps>,
    nll: (f64, usize),
}

/// A label of a micro-batch: its pair, which answers' log-probabilities it enters (a token the
/// two answers share enters both), whether it is one of the answers' tokens (not the prompt's),
/// and whether the NLL term averages it.
#[derive(Clone, Copy)]
struct Row {
    pair: usize,
    chosen: bool,
    rejected: bool,
    answer: bool,
    in_nll: bool,
}

impl Row {
    /// Pair `pair`'s label entering the `[chosen, rejected]` answers' log-probabilities it is
    /// marked for; the NLL term averages the chosen side's as `nll` says.
    fn new(pair: usize, [chosen, rejected]: [bool; 2], answer: bool, nll: NllTerm) -> Row {
        let in_nll = chosen
            && match nll {
                NllTerm::None => false,
                NllTerm::Answer => answer,
                NllTerm::Sequence => true,
            };
        Row {
            pair,
            chosen,
            rejected,
            answer,
            in_nll,
        }
    }
}

/// A micro-batch's pairs through the model in `mode`: each label token's cross-entropy (with
/// its graph when `mode` trains), what each label is, and what they measure.
fn forward(
    model: &Llama,
    pairs: &[&Pair],
    nll: NllTerm,
    (packing, pad): (bool, u32),
    mode: ForwardMode,
) -> Result<(Batch, super::ops::TokenLosses, Vec<Row>, Measured)> {
    let (batch, rows) = sequences(pairs, nll, packing, pad, model)?;
    let token_losses = model.batch_token_losses(&batch, mode)?;
    let values: Vec<f32> = token_losses
        .losses
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?;
    let measured = measure(pairs.len(), &rows, &values);
    Ok((batch, token_losses, rows, measured))
}

fn measure(pairs: usize, rows: &[Row], token_losses: &[f32]) -> Measured {
    let mut logps = vec![
        PairLogps {
            chosen: 0.0,
            rejected: 0.0,
            chosen_tokens: 0,
            rejected_tokens: 0,
        };
        pairs
    ];
    let (mut nll_sum, mut nll_tokens) = (0f64, 0usize);
    for (row, &loss) in rows.iter().zip(token_losses) {
        let loss = loss as f64;
        if row.answer {
            let p = &mut logps[row.pair];
            if row.chosen {
                p.chosen -= loss;
                p.chosen_tokens += 1;
            }
            if row.rejected {
                p.rejected -= loss;
                p.rejected_tokens += 1;
            }
        }
        if row.in_nll {
            nll_sum += loss;
            nll_tokens += 1;
        }
    }
    Measured {
        logps,
        nll: (nll_sum, nll_tokens),
    }
}

/// The summed log-probabilities of each pair's answers under the model in `mode` (no graph):
/// the reference of a DPO run, computed once before its first step.
pub fn reference_logps(
    model: &Llama,
    pairs: &[Pair],
    batch_size: usize,
    packing: bool,
    pad: u32,
    mode: ForwardMode,
) -> Result<Vec<ReferenceLogps>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&Pair> = chunk.iter().collect();
        let (_, _, _, m) = forward(model, &refs, NllTerm::None, (packing, pad), mode)?;
        out.extend(m.logps.iter().map(|p| ReferenceLogps {
            chosen: p.chosen,
            rejected: p.rejected,
        }));
    }
    Ok(out)
}

/// What a micro-batch of pairs gave: the step's part (the tensor its backward runs from), the
/// rewards, and each pair's answer log-probabilities.
pub(crate) struct MicroPairs {
    pub step: super::step::MicroStep,
    pub rewards: RewardSums,
    pub logps: Vec<PairLogps>,
}

/// A micro-batch of a preference step: forward, the loss and its per-token weights, and the
/// weighted sum the backward runs from; `share` is the micro-batch's share of the step's pairs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn micro_step(
    model: &Llama,
    method: &Method,
    pairs: &[&Pair],
    reference: &[ReferenceLogps],
    share: f64,
    packing: bool,
    pad: u32,
    mode: ForwardMode,
) -> Result<MicroPairs> {
    let (batch, token_losses, rows, m) =
        forward(model, pairs, nll_term(method), (packing, pad), mode)?;
    let loss = pair_loss(method, &m.logps, reference, m.nll);
    // d loss / d token loss: a token's log-probability is minus its cross-entropy
    let weights: Vec<f32> = rows
        .iter()
        .map(|r| {
            let mut w = 0.0;
            if r.answer && r.chosen {
                w -= loss.d_chosen[r.pair];
            }
            if r.answer && r.rejected {
                w -= loss.d_rejected[r.pair];
            }
            if r.in_nll {
                w += loss.nll_weight;
            }
            (share * w) as f32
        })
        .collect();
    let weights = Tensor::from_vec(weights, rows.len(), &model.device)?
        .to_dtype(token_losses.losses.dtype())?;
    let objective = (token_losses.losses * weights)?.sum_all()?;
    Ok(MicroPairs {
        step: super::step::MicroStep {
            objective,
            loss: share * loss.loss,
            correct: token_losses.correct,
            tokens: batch.tokens,
        },
        rewards: loss.rewards,
        logps: m.logps,
    })
}

/// One batch of pairs through the model as a training step sees it (dropout off): the loss of
/// `method` (the mean over the pairs), each pair's answer log-probabilities, the reward metrics
/// and the gradient of every LoRA factor, in [`Llama::lora_vars`] order. What the TRL fixtures
/// are checked against; the trainer's step runs the same code.
pub fn loss_and_gradients(
    model: &Llama,
    method: &Method,
    pairs: &[Pair],
    reference: &[ReferenceLogps],
    packing: bool,
) -> Result<Probe> {
    let refs: Vec<&Pair> = pairs.iter().collect();
    let mode = ForwardMode::train(0);
    let m = micro_step(model, method, &refs, reference, 1.0, packing, 0, mode)?;
    let store = m.step.objective.backward()?;
    Ok(Probe {
        loss: m.step.loss,
        logps: m.logps,
        rewards: m.rewards.means(),
        grads: model.lora_grads(&store)?,
    })
}

/// What [`loss_and_gradients`] measured.
pub struct Probe {
    pub loss: f64,
    pub logps: Vec<PairLogps>,
    pub rewards: RewardMetrics,
    pub grads: Vec<Tensor>,
}

/// The preference loss and reward metrics over `pairs` (no graph), in micro-batches of
/// `batch_size`: a DPO or ORPO run's evaluation.
pub(crate) fn evaluate_pairs(
    model: &Llama,
    method: &Method,
    pairs: &[Pair],
    reference: &[ReferenceLogps],
    batch_size: usize,
    packing: bool,
    pad: u32,
) -> Result<(f64, RewardMetrics)> {
    let nll = nll_term(method);
    let (mut loss, mut rewards) = (0f64, RewardSums::default());
    let mut start = 0;
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&Pair> = chunk.iter().collect();
        let (_, _, _, m) = forward(model, &refs, nll, (packing, pad), ForwardMode::EVAL)?;
        let reference = reference.get(start..start + chunk.len()).unwrap_or(&[]);
        let l = pair_loss(method, &m.logps, reference, m.nll);
        loss += l.loss * chunk.len() as f64;
        rewards.merge(l.rewards);
        start += chunk.len();
    }
    Ok((loss / pairs.len().max(1) as f64, rewards.means()))
}
