//! Text generation: the prompt is prefilled into a key/value cache, then one token at a time is
//! decoded from it, picked greedily or sampled (temperature, top-k, top-p, penalties, a seed),
//! and streamed out as text until an end-of-turn token, a stop sequence or the token limit.

use candle_core::{Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::model::{BaseModel, Llama};
use super::tokenizer::{Message, TextTokenizer};
use super::{Error, Result};

/// How to pick tokens; the defaults decode greedily.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0: greedy (argmax).
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches this (1: all).
    pub top_p: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    pub seed: u64,
    /// Text that ends the answer where it first appears (not included).
    pub stop: Vec<String>,
    /// Divides a positive logit (multiplies a negative one) of every token already in the
    /// prompt or the answer, as transformers' `repetition_penalty` (1: off).
    pub repetition_penalty: f64,
    /// Subtracted from a token's logit once per time it appears in the answer (OpenAI's).
    pub frequency_penalty: f64,
    /// Subtracted from a token's logit if it appears in the answer at all (OpenAI's).
    pub presence_penalty: f64,
    /// Added to the logits of these tokens before anything else (OpenAI's `logit_bias`: −100
    /// bans a token, 100 all but forces it); ids outside the vocabulary change nothing.
    pub logit_bias: Vec<(u32, f32)>,
    /// Decode past end-of-turn tokens, to `max_tokens` (vLLM's `ignore_eos`: what a benchmark
    /// of decoding speed wants).
    pub ignore_eos: bool,
    /// Record each picked token's log-probability and this many of the likeliest alternatives'
    /// (OpenAI's `logprobs` / `top_logprobs`, at most 20); `None`: record nothing.
    pub logprobs: Option<usize>,
}

impl Default for Sampling {
    fn default() -> Sampling {
        Sampling {
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: Vec::new(),
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

impl Sampling {
    /// Refuses values that have no meaning, naming the field as the HTTP API does.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if !(self.temperature.is_finite() && (0.0..=2.0).contains(&self.temperature)) {
            return Err((
                "temperature",
                format!("must be between 0 and 2, got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(("top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return Err((
                "repetition_penalty",
                format!("must be in (0, 10], got {}", self.repetition_penalty),
            ));
        }
        if self.logit_bias.len() > 300
            || self
                .logit_bias
                .iter()
                .any(|b| !(-100.0..=100.0).contains(&b.1))
        {
            return Err((
                "logit_bias",
                "at most 300 tokens, each biased by -100 to 100".into(),
            ));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                return Err((name, format!("must be between -2 and 2, got {v}")));
            }
        }
        if self.logprobs.is_some_and(|n| n > 20) {
            return Err(("top_logprobs", "at most 20 alternatives".into()));
        }
        if self.stop.len() > 4 || self.stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(("stop", "at most 4 sequences of 1 to 256 bytes".into()));
        }
        Ok(())
    }
}

/// Why a generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-turn token or a stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// A picked token's log-probability under the model: the log-softmax of its raw logits, before
/// any sampling setting changes them (what OpenAI's and vLLM's `logprobs` report), and the
/// likeliest alternatives', most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// A grammar the answer must follow (structured output): asked which tokens it allows before
/// each pick, told the token picked. The engine knows nothing of how it decides.
pub trait TokenConstraint: Send {
    /// Sets the logit of every token it forbids now to minus infinity.
    fn mask(&mut self, logits: &mut [f32]) -> Result<()>;
    /// `token` was picked; answers whether the grammar is complete (nothing may follow it).
    fn commit(&mut self, token: u32) -> Result<bool>;
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The answer's tokens (the end-of-turn token excluded).
    pub tokens: Vec<u32>,
    /// Each token's log-probability, when [`Sampling::logprobs`] asked for them.
    pub logprobs: Vec<TokenLogprob>,
    /// The answer's text, cut before a stop sequence.
    pub text: String,
    pub finish: Finish,
    pub(crate) prompt_tokens: usize,
}

/// The tokens that end a turn: the tokenizer's EOS and the end-of-turn markers of the common
/// chat templates when the vocabulary has them as single tokens.
pub(crate) fn end_of_turn_ids(tok: &TextTokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = tok.eos_id.into_iter().collect();
    let named = tok.eos_token.iter().map(String::as_str);
    for marker in named.chain([
        "<|im_end|>",
        "<|eot_id|>",
        "<|end|>",
        "<end_of_turn>",
        "</s>",
    ]) {
        if let Some(id) = tok.inner.token_to_id(marker) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// Where an answer's text goes as it is decided, with the log-probabilities of the tokens picked
/// since the last call (empty unless asked for); `false`: nobody is listening any more.
pub type TextSink<'a> = &'a mut dyn FnMut(&str, &[TokenLogprob]) -> bool;

/// Prompt tokens one forward pass prefills: [`generate`] and a server's batch (which runs one
/// chunk between two decode steps) cut a prompt alike, so a request decodes to the same numbers
/// either way; and attention's score matrices stay a chunk's rows tall.
pub const PREFILL_CHUNK: usize = 256;

/// Generates a continuation of `prompt_ids`, calling `on_text` with each new piece of text as it
/// is decided (text that may still turn out to start a stop sequence, or an incomplete UTF-8
/// character, is held back until it is known). `on_text` returning `false` stops early (a
/// client that went away); what was generated so far is returned.
pub fn generate(
    model: &Llama,
    tok: &TextTokenizer,
    prompt_ids: &[u32],
    sampling: &Sampling,
    on_text: TextSink,
) -> Result<Generation> {
    let mut decoding = Decoding::new(tok, prompt_ids, sampling)?;
    let mut cache = model.new_cache();
    let mut chunks = prompt_ids.chunks(PREFILL_CHUNK);
    // an empty prompt goes through too, for the model's own refusal
    let mut logits = model.forward_cached(chunks.next().unwrap_or_default(), &mut cache)?;
    for chunk in chunks {
        logits = model.forward_cached(chunk, &mut cache)?;
    }
    while let Some(next) = decoding.advance(tok, &logits, on_text)? {
        logits = model.forward_cached(&[next], &mut cache)?;
    }
    Ok(decoding.finish(on_text))
}

/// One answer being decoded: what has been picked, the text it makes and how much of it was
/// sent. The model's forward passes are its caller's ([`generate`], or a batch that decodes
/// many answers at once); this decides each token from the logits it is handed.
pub struct Decoding {
    sampling: Sampling,
    prompt: Vec<u32>,
    ends: Vec<u32>,
    rng: ChaCha8Rng,
    tokens: Vec<u32>,
    counts: std::collections::HashMap<u32, usize>,
    text: String,
    sent: usize,
    logprobs: Vec<TokenLogprob>,
    logprobs_sent: usize,
    constraint: Option<Box<dyn TokenConstraint>>,
    finish: Finish,
    done: bool,
}

impl Decoding {
    pub fn new(tok: &TextTokenizer, prompt_ids: &[u32], sampling: &Sampling) -> Result<Decoding> {
        if prompt_ids.is_empty() {
            return Err(Error::Data("the prompt is empty".into()));
        }
        Ok(Decoding {
            sampling: sampling.clone(),
            prompt: prompt_ids.to_vec(),
            ends: end_of_turn_ids(tok),
            rng: ChaCha8Rng::seed_from_u64(sampling.seed),
            tokens: Vec::new(),
            counts: Default::default(),
            text: String::new(),
            sent: 0,
            logprobs: Vec::new(),
            logprobs_sent: 0,
            constraint: None,
            finish: Finish::Length,
            done: sampling.max_tokens == 0,
        })
    }

    /// Tokens picked so far.
    pub fn picked(&self) -> usize {
        self.tokens.len()
    }

    /// This answer follows `constraint`: each pick among the tokens it allows, the answer over
    /// when it is complete.
    pub fn constrained(mut self, constraint: Box<dyn TokenConstraint>) -> Decoding {
        self.constraint = Some(constraint);
        self
    }

    /// Picks the next token from `logits` (the last position's, `(vocab,)`) and sends the text
    /// it settles. Returns the token to run through the model next, or `None` when the answer is
    /// over: an end-of-turn token, a stop sequence, `max_tokens`, or `on_text` refusing more.
    pub fn advance(
        &mut self,
        tok: &TextTokenizer,
        logits: &Tensor,
        on_text: TextSink,
    ) -> Result<Option<u32>> {
        if self.done {
            return Ok(None);
        }
        let next = pick(
            logits,
            &self.prompt,
            &self.counts,
            &self.sampling,
            &mut self.rng,
            self.constraint.as_mut(),
        )?;
        if self.ends.contains(&next) && !self.sampling.ignore_eos {
            self.finish = Finish::Stop;
            self.done = true;
            return Ok(None);
        }
        if let Some(top) = self.sampling.logprobs {
            self.logprobs.push(token_logprob(logits, next, top)?);
        }
        let complete = match &mut self.constraint {
            Some(c) => c.commit(next)?,
            None => false,
        };
        self.tokens.push(next);
        *self.counts.entry(next).or_default() += 1;
        self.text = tok.decode(&self.tokens)?;
        let stop = self.sampling.stop.iter();
        if let Some(at) = stop.filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(at);
            self.finish = Finish::Stop;
            self.done = true;
            return Ok(None);
        }
        let ready = settled_len(&self.text, &self.sampling.stop);
        if ready > self.sent {
            let logprobs = &self.logprobs[self.logprobs_sent..];
            if !on_text(&self.text[self.sent..ready], logprobs) {
                self.done = true;
                return Ok(None);
            }
            self.sent = ready;
            self.logprobs_sent = self.logprobs.len();
        }
        if complete {
            self.finish = Finish::Stop;
        }
        self.done = complete || self.tokens.len() >= self.sampling.max_tokens;
        Ok((!self.done).then_some(next))
    }

    /// The answer, its held-back text sent.
    pub fn finish(self, on_text: TextSink) -> Generation {
        if self.text.len() > self.sent || self.logprobs.len() > self.logprobs_sent {
            on_text(
                &self.text[self.sent..],
                &self.logprobs[self.logprobs_sent..],
            );
        }
        Generation {
            tokens: self.tokens,
            logprobs: self.logprobs,
            text: self.text,
            finish: self.finish,
            prompt_tokens: self.prompt.len(),
        }
    }
}

/// How much of `text` can be sent: not a trailing replacement character (the rest of a UTF-8
/// sequence is still to come) nor a tail that a stop sequence could begin with.
fn settled_len(text: &str, stop: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    // the longest tail that is the start of a stop sequence (a suffix that is a whole `str`
    // starts on a character boundary)
    let held = stop
        .iter()
        .filter_map(|s| {
            (1..s.len())
                .rev()
                .find(|&k| s.is_char_boundary(k) && text[..end].ends_with(&s[..k]))
        })
        .max()
        .unwrap_or(0);
    end - held
}

/// The next token from the last position's logits.
fn pick(
    logits: &Tensor,
    prompt: &[u32],
    counts: &std::collections::HashMap<u32, usize>,
    s: &Sampling,
    rng: &mut ChaCha8Rng,
    constraint: Option<&mut Box<dyn TokenConstraint>>,
) -> Result<u32> {
    let penalised = s.repetition_penalty != 1.0
        || s.frequency_penalty != 0.0
        || s.presence_penalty != 0.0
        || !s.logit_bias.is_empty();
    if s.temperature == 0.0 && !penalised && constraint.is_none() {
        return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
    }
    let mut l: Vec<f32> = logits.to_vec1()?;
    if let Some(c) = constraint {
        c.mask(&mut l)?;
    }
    for &(t, bias) in &s.logit_bias {
        if let Some(v) = l.get_mut(t as usize) {
            *v += bias;
        }
    }
    if s.repetition_penalty != 1.0 {
        let p = s.repetition_penalty as f32;
        let seen = prompt.iter().chain(counts.keys());
        let mut done = std::collections::HashSet::new();
        for &t in seen {
            if done.insert(t) {
                if let Some(v) = l.get_mut(t as usize) {
                    *v = if *v > 0.0 { *v / p } else { *v * p };
                }
            }
        }
    }
    for (&t, &n) in counts {
        if let Some(v) = l.get_mut(t as usize) {
            *v -= (s.frequency_penalty * n as f64 + s.presence_penalty) as f32;
        }
    }
    if s.temperature == 0.0 {
        return Ok(argmax(&l));
    }
    // the candidates, most likely first, cut by top-k, then softmax and top-p
    let mut order: Vec<u32> = (0..l.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let t = s.temperature as f32;
    let top = l[order[0] as usize];
    let mut probs: Vec<f32> = order
        .iter()
        .map(|&i| ((l[i as usize] - top) / t).exp())
        .collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    let mut keep = probs.len();
    if s.top_p < 1.0 {
        let mut acc = 0f32;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= s.top_p as f32 {
                keep = i + 1;
                break;
            }
        }
    }
    let mass: f32 = probs[..keep].iter().sum();
    let mut draw = rng.random::<f32>() * mass;
    for (i, p) in probs[..keep].iter().enumerate() {
        draw -= p;
        if draw <= 0.0 {
            return Ok(order[i]);
        }
    }
    Ok(order[keep - 1])
}

/// `token`'s log-softmax in `logits` and the `top` likeliest tokens' (in float64 sums, so a
/// 150k-token vocabulary loses nothing to rounding).
fn token_logprob(logits: &Tensor, token: u32, top: usize) -> Result<TokenLogprob> {
    let l: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = l.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let of = |t: u32| (l[t as usize] as f64 - log_z) as f32;
    let mut best: Vec<u32> = Vec::with_capacity(top + 1);
    if top > 0 {
        // one pass keeping the `top` largest, not a sort of the vocabulary
        for (i, &v) in l.iter().enumerate() {
            if best.len() < top || v > l[*best.last().expect("top > 0") as usize] {
                let at = best.partition_point(|&b| l[b as usize] >= v);
                best.insert(at, i as u32);
                best.truncate(top);
            }
        }
    }
    Ok(TokenLogprob {
        token,
        logprob: of(token),
        top: best.into_iter().map(|t| (t, of(t))).collect(),
    })
}

fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in l.iter().enumerate() {
        if *v > l[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy continuation of `prompt_ids` that recomputes the whole sequence for every token (no
/// cache): the reference the cached path is tested against.
pub fn greedy_uncached(
    base: &BaseModel,
    prompt_ids: &[u32],
    max_new_tokens: usize,
) -> Result<Vec<u32>> {
    let ends = end_of_turn_ids(&base.tokenizer);
    let mut ids = prompt_ids.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_new_tokens {
        let input = Tensor::new(ids.as_slice(), &base.model.device)?.unsqueeze(0)?;
        let logits = base.model.logits(&input)?; // (1, t, vocab)
        let next = logits
            .squeeze(0)?
            .get(ids.len() - 1)?
            .argmax(D::Minus1)?
            .to_scalar::<u32>()?;
        if ends.contains(&next) {
            break;
        }
        ids.push(next);
        out.push(next);
    }
    Ok(out)
}

/// Greedy continuation through the cache.
pub fn greedy(base: &BaseModel, prompt_ids: &[u32], max_new_tokens: usize) -> Result<Vec<u32>> {
    let sampling = Sampling {
        max_tokens: max_new_tokens,
        ..Sampling::default()
    };
    Ok(generate(
        &base.model,
        &base.tokenizer,
        prompt_ids,
        &sampling,
        &mut |_, _| true,
    )?
    .tokens)
}

/// Answers one user message through the model's chat template, greedily.
pub fn chat(base: &BaseModel, user: &str, max_new_tokens: usize) -> Result<String> {
    let prompt = base
        .tokenizer
        .render_chat(&[Message::new("user", user)], true)?;
    let ids = base.tokenizer.encode(&prompt)?;
    let answer = greedy(base, &ids, max_new_tokens)?;
    base.tokenizer.decode(&answer)
}
