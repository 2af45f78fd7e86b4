//! Structured output: a JSON schema (OpenAI's `response_format`) compiled by llguidance into a
//! grammar over the model's own tokens, which masks every step's logits so that only tokens
//! that keep the answer a valid prefix of a document the schema accepts can be picked, and ends
//! the answer when the document is complete. The engine sees it only as a
//! [`TokenConstraint`].

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::train::generate::{end_of_turn_ids, TokenConstraint};
use crate::train::tokenizer::TextTokenizer;
use crate::train::{Error, Result};

/// A tokenizer's tokens as bytes, and the grammar compiler over them (built once per base
/// model): what structured output and log-probabilities need.
pub struct Vocabulary {
    factory: ParserFactory,
}

/// What llguidance asks of a tokenizer: each token's bytes (the trie) and how text tokenizes.
struct Env {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => match self.tokenizer.encode(text, false) {
                Ok(enc) => enc.get_ids().to_vec(),
                Err(_) => self.trie.greedy_tokenize(s),
            },
            // a piece of a character: the trie's longest matches
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

impl Vocabulary {
    pub fn new(tok: &TextTokenizer) -> Result<Vocabulary> {
        let fail = |e: &dyn std::fmt::Display| Error::Tokenizer(format!("structured output: {e}"));
        let described = tok.inner.to_string(false).map_err(|e| fail(&e))?;
        let described: Value = serde_json::from_str(&described).map_err(|e| fail(&e))?;
        let mut words =
            llguidance::token_bytes_from_tokenizer_json(&described).map_err(|e| fail(&e))?;
        let vocab = tok.inner.get_vocab_size(true).max(words.len());
        words.resize(vocab, Vec::new());
        let ends = end_of_turn_ids(tok);
        let Some(&eos) = ends.first() else {
            return Err(fail(&"the tokenizer has no end-of-turn token"));
        };
        let trie = TokTrie::from(&TokRxInfo::new(vocab as u32, eos), &words).with_eos_tokens(&ends);
        let env: TokEnv = Arc::new(Env {
            trie,
            tokenizer: tok.inner.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| fail(&e))?;
        factory.quiet();
        Ok(Vocabulary { factory })
    }

    /// Token `id`'s bytes as it appears in text (a special token's name without its marker).
    pub fn bytes(&self, id: u32) -> Vec<u8> {
        let trie = self.factory.tok_env().tok_trie();
        if (id as usize) < trie.vocab_size() && !trie.token(id).is_empty() {
            trie.decode_ext(&[id], true)
        } else {
            Vec::new()
        }
    }

    /// A constraint that accepts the JSON documents `schema` describes, written compactly on one
    /// line (`", "` and `": "` between items, no other whitespace) unless the schema's own
    /// `x-guidance` options say otherwise. An error says why the schema cannot be compiled.
    pub fn json_schema(&self, schema: &Value) -> std::result::Result<JsonConstraint, String> {
        let mut schema = schema.clone();
        let Some(object) = schema.as_object_mut() else {
            return Err("a JSON schema is an object".into());
        };
        object.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| e.to_string())?;
        let vocab = self.factory.tok_env().tok_trie().vocab_size();
        Ok(JsonConstraint {
            matcher: Matcher::new(Ok(parser)),
            vocab,
        })
    }
}

/// One answer's place in its grammar.
pub struct JsonConstraint {
    matcher: Matcher,
    vocab: usize,
}

impl TokenConstraint for JsonConstraint {
    fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| Error::Model(format!("structured output: {e}")))?;
        for (i, v) in logits.iter_mut().enumerate() {
            // rows past the tokenizer's vocabulary (padding) are never a token
            if i >= self.vocab || !allowed.is_allowed(i as TokenId) {
                *v = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    fn commit(&mut self, token: u32) -> Result<bool> {
        self.matcher
            .consume_token(token)
            .map_err(|e| Error::Model(format!("structured output: {e}")))?;
        Ok(self.matcher.is_stopped())
    }
}
