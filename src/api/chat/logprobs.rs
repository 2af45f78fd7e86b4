//! Log-probabilities as OpenAI returns them: a chat's `logprobs.content` (each token with its
//! text, bytes and alternatives) and a completion's `tokens` / `token_logprobs` /
//! `top_logprobs` / `text_offset` lists.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::inference::structured::Vocabulary;
use crate::train::generate::TokenLogprob;

/// Writes one answer's log-probabilities, piece by piece when it is streamed.
pub(super) struct Logprobs {
    vocabulary: Arc<Vocabulary>,
    chat: bool,
    /// Bytes of answer text before the next token (a completion's `text_offset`).
    offset: usize,
}

impl Logprobs {
    pub(super) fn new(vocabulary: Arc<Vocabulary>, chat: bool) -> Logprobs {
        Logprobs {
            vocabulary,
            chat,
            offset: 0,
        }
    }

    fn text(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self.vocabulary.bytes(id);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    /// The `logprobs` object of a choice (or of a streamed chunk) for `tokens`.
    pub(super) fn render(&mut self, tokens: &[TokenLogprob]) -> Value {
        if self.chat {
            let entry = |id: u32, logprob: f32| {
                let (token, bytes) = self.text(id);
                json!({"token": token, "logprob": logprob, "bytes": bytes})
            };
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut e = entry(t.token, t.logprob);
                    e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                    e
                })
                .collect();
            return json!({"content": content, "refusal": null});
        }
        let (mut texts, mut logprobs, mut tops, mut offsets) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for t in tokens {
            let (token, _) = self.text(t.token);
            offsets.push(self.offset);
            self.offset += token.len();
            texts.push(token);
            logprobs.push(t.logprob);
            let top: Map<String, Value> = t
                .top
                .iter()
                .map(|&(id, lp)| (self.text(id).0, json!(lp)))
                .collect();
            tops.push(Value::Object(top));
        }
        json!({"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops,
               "text_offset": offsets})
    }
}
