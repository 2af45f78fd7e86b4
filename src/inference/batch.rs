//! Continuous batching: one decode loop per loaded base, on a thread of its own. Requests join
//! the running batch between two decode steps and leave it as each one ends; no request waits
//! for a batch to drain. Each step decodes one token of every running request at once, whatever
//! adapter each uses ([`Llama::decode_batch`]: the frozen products once for all rows, each
//! adapter's LoRA products over its rows). A new request's prompt is prefilled through its own
//! view of the model in chunks, one chunk between two decode steps, so a long prompt does not
//! stall the others' tokens.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::Served;
use crate::metrics::Metrics;
use crate::train::generate::{
    Decoding, Generation, Sampling, TokenConstraint, TokenLogprob, PREFILL_CHUNK,
};
use crate::train::model::{BaseModel, DecodeRow, KvCache};
use crate::train::{Error, Result};

/// Where a request's text (and its tokens' log-probabilities, when asked for) goes as it is
/// decided; `false`: nobody is listening any more.
pub type OnText = Box<dyn FnMut(&str, &[TokenLogprob]) -> bool + Send>;

/// The key/value cache memory of all decode loops (`--kv-cache-mib`), reserved by each request
/// for its prompt and longest answer when it joins a batch.
pub struct KvBudget {
    total: usize,
    used: Mutex<usize>,
    metrics: Arc<Metrics>,
}

impl KvBudget {
    pub fn new(total: usize, metrics: Arc<Metrics>) -> KvBudget {
        metrics.kv_cache_budget_bytes.set(total as i64);
        KvBudget {
            total,
            used: Mutex::new(0),
            metrics,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// `bytes` of it, if they are free now.
    fn take(self: &Arc<KvBudget>, bytes: usize) -> Option<KvReservation> {
        let mut used = self.used.lock().expect("no panics while holding it");
        if *used + bytes > self.total {
            return None;
        }
        *used += bytes;
        self.metrics.kv_cache_bytes.set(*used as i64);
        Some(KvReservation {
            budget: self.clone(),
            bytes,
        })
    }
}

/// Cache memory a running request holds; given back when it is dropped (the request retired).
struct KvReservation {
    budget: Arc<KvBudget>,
    bytes: usize,
}

impl Drop for KvReservation {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().expect("no panics while holding it");
        *used -= self.bytes;
        self.budget.metrics.kv_cache_bytes.set(*used as i64);
    }
}

/// A place in the line of requests waiting for a batch (`--max-waiting-generations`); the
/// line shortens when it is dropped, as its request joins a batch or goes away.
pub struct Place {
    waiting: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Place {
    /// A place, unless `max` requests wait already.
    pub fn take(waiting: &Arc<AtomicUsize>, max: usize, metrics: &Arc<Metrics>) -> Option<Place> {
        let taken = waiting.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        });
        taken.ok()?;
        metrics.generations_waiting.inc();
        Some(Place {
            waiting: waiting.clone(),
            metrics: metrics.clone(),
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        self.metrics.generations_waiting.dec();
    }
}

/// A generation handed to a base's decode loop.
pub struct Request {
    pub served: Arc<Served>,
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
    /// The grammar its answer must follow (structured output), if any.
    pub constraint: Option<Box<dyn TokenConstraint>>,
    pub on_text: OnText,
    /// The answer; a request whose receiver is dropped (its client hung up) is abandoned.
    pub done: tokio::sync::oneshot::Sender<Result<Generation>>,
    /// Its place in the waiting line, given up when it joins the batch.
    pub place: Option<Place>,
    /// The cache memory it reserves when it joins (prompt and longest answer).
    pub kv_bytes: usize,
    /// Whose it is (an API key's owner; opaque here): the batch is shared fairly between them.
    pub tenant: Option<String>,
    pub(super) arrived: Instant,
}

/// The handle of one base's decode loop; the loop ends when the last handle is dropped and
/// its running requests are done.
pub struct Batcher {
    tx: mpsc::Sender<Request>,
    /// The most requests one decode step has run together.
    peak_rows: Arc<AtomicUsize>,
}

impl Batcher {
    /// Starts the decode loop of `base`, at most `max_rows` requests decoded together and their
    /// caches within `kv` (the others wait, first come first served).
    pub fn start(base: Arc<BaseModel>, max_rows: usize, kv: Arc<KvBudget>) -> Batcher {
        let (tx, rx) = mpsc::channel();
        let name = base.name.clone();
        let peak_rows = Arc::new(AtomicUsize::new(0));
        let peak = peak_rows.clone();
        std::thread::Builder::new()
            .name("qtune-decode".into())
            .spawn(move || {
                DecodeLoop {
                    metrics: kv.metrics.clone(),
                    kv,
                    base,
                    max_rows: max_rows.max(1),
                    waiting: VecDeque::new(),
                    running: Vec::new(),
                    peak_rows: peak,
                }
                .run(rx);
                tracing::debug!(base = %name, "decode loop ended");
            })
            .expect("a thread can be spawned");
        Batcher { tx, peak_rows }
    }

    /// The most requests one decode step has run together so far.
    pub fn peak_rows(&self) -> usize {
        self.peak_rows.load(Ordering::Relaxed)
    }

    pub fn submit(&self, request: Request) {
        if let Err(mpsc::SendError(r)) = self.tx.send(request) {
            // the loop is gone (it ends only when every handle is dropped: not while this one
            // exists), so this does not happen; answer rather than hang if it does
            r.done
                .send(Err(Error::Model("the decode loop has stopped".into())))
                .ok();
        }
    }
}

/// A request in the batch: prefilling its prompt, or decoding with its next token to run.
struct Row {
    request: Request,
    decoding: Decoding,
    cache: KvCache,
    prefilled: usize,
    next: Option<u32>,
    /// Why this request failed, to be answered when it is retired.
    failed: Option<String>,
    /// When its last token was picked (its arrival before the first).
    last_token: Instant,
    _kv: KvReservation,
}

impl Row {
    /// Whoever asked has gone: nobody awaits the answer.
    fn abandoned(&self) -> bool {
        self.request.done.is_closed()
    }

    /// Counts the token picked since `before` tokens, if one was: its time since the last (or
    /// since the request arrived, for the first).
    fn count_token(&mut self, metrics: &Metrics, before: usize) {
        if self.decoding.picked() == before {
            return;
        }
        let now = Instant::now();
        let since = now.duration_since(self.last_token).as_secs_f64();
        if before == 0 {
            metrics.time_to_first_token.observe(since);
        } else {
            metrics.inter_token_latency.observe(since);
        }
        metrics.generated_tokens.inc();
        self.last_token = now;
    }
}

struct DecodeLoop {
    kv: Arc<KvBudget>,
    metrics: Arc<Metrics>,
    base: Arc<BaseModel>,
    max_rows: usize,
    waiting: VecDeque<Request>,
    running: Vec<Row>,
    peak_rows: Arc<AtomicUsize>,
}

impl DecodeLoop {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(r) => self.waiting.push_back(r),
                    Err(_) => return,
                }
            }
            self.waiting.extend(rx.try_iter());
            self.admit();
            self.prefill_one();
            if let Err(message) = guarded(|| self.decode_step()) {
                // one forward for all of them: the batch's requests fail, the loop goes on
                tracing::error!(error = %message, "a decode step failed");
                for row in &mut self.running {
                    row.failed.get_or_insert(message.clone());
                }
            }
            self.retire();
        }
    }

    /// Moves waiting requests into the batch while it has room and their caches fit the
    /// budget: next, the oldest request of the tenant with the fewest requests running (so a
    /// tenant that sends many at once cannot keep another's out of the batch), first come first
    /// served between equals. One whose cache does not fit holds up the others.
    fn admit(&mut self) {
        while self.running.len() < self.max_rows {
            let Some(mut request) = self.next_fair() else {
                return;
            };
            if request.done.is_closed() {
                self.metrics
                    .generations
                    .with_label_values(&["abandoned"])
                    .inc();
                continue;
            }
            let Some(kv) = self.kv.take(request.kv_bytes) else {
                // back in front: it is the one chosen, and stays first among its tenant's
                self.waiting.push_front(request);
                return;
            };
            request.place = None;
            self.metrics.generations_running.inc();
            self.metrics
                .prompt_tokens
                .inc_by(request.prompt.len() as u64);
            let tok = request.served.tokenizer();
            let decoding = Decoding::new(tok, &request.prompt, &request.sampling);
            let decoding = match request.constraint.take() {
                Some(c) => decoding.map(|d| d.constrained(c)),
                None => decoding,
            };
            let positions = request.kv_bytes / request.served.model().kv_bytes_per_token().max(1);
            match decoding {
                Ok(decoding) => self.running.push(Row {
                    cache: request.served.model().new_cache_for(positions),
                    last_token: request.arrived,
                    request,
                    decoding,
                    prefilled: 0,
                    next: None,
                    failed: None,
                    _kv: kv,
                }),
                Err(e) => {
                    self.metrics.generations_running.dec();
                    self.metrics.generations.with_label_values(&["error"]).inc();
                    request.done.send(Err(e)).ok();
                }
            }
        }
    }

    /// Takes the waiting request [`DecodeLoop::admit`] admits next.
    fn next_fair(&mut self) -> Option<Request> {
        let running = |tenant: &Option<String>| {
            self.running
                .iter()
                .filter(|r| &r.request.tenant == tenant)
                .count()
        };
        let at = (0..self.waiting.len()).min_by_key(|&i| (running(&self.waiting[i].tenant), i))?;
        self.waiting.remove(at)
    }

    /// One chunk of the oldest prompt still prefilling, through its own view of the model; a
    /// prompt done picks its first token. A failure fails this request alone.
    fn prefill_one(&mut self) {
        let Some(row) = self
            .running
            .iter_mut()
            .find(|r| r.prefilled < r.request.prompt.len() && r.failed.is_none())
        else {
            return;
        };
        let outcome = guarded(|| {
            let prompt = &row.request.prompt;
            let end = (row.prefilled + PREFILL_CHUNK).min(prompt.len());
            let model = row.request.served.model();
            let logits = model.forward_cached(&prompt[row.prefilled..end], &mut row.cache)?;
            row.prefilled = end;
            if end == prompt.len() {
                let tok = row.request.served.tokenizer();
                row.next = row
                    .decoding
                    .advance(tok, &logits, &mut row.request.on_text)?;
                row.count_token(&self.metrics, 0);
            }
            Ok(())
        });
        if let Err(message) = outcome {
            row.failed = Some(message);
        }
    }

    /// One token of every decoding row, in one batched forward.
    fn decode_step(&mut self) -> Result<()> {
        let mut rows: Vec<&mut Row> = self
            .running
            .iter_mut()
            .filter(|r| r.next.is_some() && r.failed.is_none() && !r.abandoned())
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let logits = {
            let mut inputs: Vec<DecodeRow> = rows
                .iter_mut()
                .map(|r| DecodeRow {
                    token: r.next.expect("filtered on it"),
                    cache: &mut r.cache,
                    adapter: r.request.served.view.as_ref(),
                })
                .collect();
            self.peak_rows.fetch_max(inputs.len(), Ordering::Relaxed);
            self.base.model.decode_batch(&mut inputs)?
        };
        self.metrics.batch_rows.observe(rows.len() as f64);
        for (k, row) in rows.into_iter().enumerate() {
            let tok = row.request.served.tokenizer();
            let before = row.decoding.picked();
            row.next = row
                .decoding
                .advance(tok, &logits.get(k)?, &mut row.request.on_text)?;
            row.count_token(&self.metrics, before);
        }
        Ok(())
    }

    /// Answers the rows that are over and drops those nobody waits for.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let row = &self.running[i];
            let prefilled = row.prefilled == row.request.prompt.len();
            let over = prefilled && row.next.is_none();
            if row.abandoned() || row.failed.is_some() || over {
                // in admission order: the oldest prompt prefills first
                let Row {
                    mut request,
                    decoding,
                    failed,
                    ..
                } = self.running.remove(i);
                let abandoned = request.done.is_closed();
                let answer = match failed {
                    Some(message) => Err(Error::Model(format!(
                        "the generation stopped on an internal error: {message}"
                    ))),
                    None => Ok(decoding.finish(&mut request.on_text)),
                };
                let finish = match &answer {
                    _ if abandoned => "abandoned",
                    Err(_) => "error",
                    Ok(g) => g.finish.as_str(),
                };
                self.metrics.generations.with_label_values(&[finish]).inc();
                self.metrics.generations_running.dec();
                request.done.send(answer).ok();
            } else {
                i += 1;
            }
        }
    }
}

/// Runs `work`; its error or panic (candle asserts on shapes) as a message.
fn guarded(work: impl FnOnce() -> Result<()>) -> std::result::Result<(), String> {
    match catch_unwind(AssertUnwindSafe(work)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into())),
    }
}
