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
use std::sync::Arc;

use super::Served;
use crate::train::generate::{Decoding, Generation, Sampling};
use crate::train::model::{BaseModel, DecodeRow, KvCache};
use crate::train::{Error, Result};

/// Prompt tokens prefilled between two decode steps.
const PREFILL_CHUNK: usize = 256;

/// Where a request's text goes as it is decided; `false`: nobody is listening any more.
pub type OnText = Box<dyn FnMut(&str) -> bool + Send>;

/// A generation handed to a base's decode loop.
pub struct Request {
    pub served: Arc<Served>,
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
    pub on_text: OnText,
    /// The answer; a request whose receiver is dropped (its client hung up) is abandoned.
    pub done: tokio::sync::oneshot::Sender<Result<Generation>>,
}

/// The handle of one base's decode loop; the loop ends when the last handle is dropped and
/// its running requests are done.
pub struct Batcher {
    tx: mpsc::Sender<Request>,
    /// The most requests one decode step has run together.
    peak_rows: Arc<AtomicUsize>,
}

impl Batcher {
    /// Starts the decode loop of `base`, at most `max_rows` requests decoded together (the
    /// others wait, first come first served).
    pub fn start(base: Arc<BaseModel>, max_rows: usize) -> Batcher {
        let (tx, rx) = mpsc::channel();
        let name = base.name.clone();
        let peak_rows = Arc::new(AtomicUsize::new(0));
        let peak = peak_rows.clone();
        std::thread::Builder::new()
            .name("qtune-decode".into())
            .spawn(move || {
                DecodeLoop {
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
}

impl Row {
    /// Whoever asked has gone: nobody awaits the answer.
    fn abandoned(&self) -> bool {
        self.request.done.is_closed()
    }
}

struct DecodeLoop {
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

    /// Moves waiting requests into the batch while it has room.
    fn admit(&mut self) {
        while self.running.len() < self.max_rows {
            let Some(request) = self.waiting.pop_front() else {
                return;
            };
            if request.done.is_closed() {
                continue;
            }
            let tok = request.served.tokenizer();
            match Decoding::new(tok, &request.prompt, &request.sampling) {
                Ok(decoding) => self.running.push(Row {
                    cache: request.served.model().new_cache(),
                    request,
                    decoding,
                    prefilled: 0,
                    next: None,
                    failed: None,
                }),
                Err(e) => {
                    request.done.send(Err(e)).ok();
                }
            }
        }
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
        for (k, row) in rows.into_iter().enumerate() {
            let tok = row.request.served.tokenizer();
            row.next = row
                .decoding
                .advance(tok, &logits.get(k)?, &mut row.request.on_text)?;
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
                let answer = match failed {
                    Some(message) => Err(Error::Model(format!(
                        "the generation stopped on an internal error: {message}"
                    ))),
                    None => Ok(decoding.finish(&mut request.on_text)),
                };
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
