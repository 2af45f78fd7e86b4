//! Tokenizer and chat template of a base model.
//!
//! From a Hugging Face folder: `tokenizer.json`, plus `tokenizer_config.json` (special tokens,
//! `chat_template`) or the `chat_template.jinja` newer checkpoints ship. From a GGUF file: built
//! from the `tokenizer.ggml.*` metadata. The chat template is rendered with minijinja, with
//! Python string methods enabled, so text matches transformers' `apply_chat_template`.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::train::error::{Area, Error, Result};

/// `[start, end)` byte offsets of a token in the text it came from.
pub(crate) type ByteSpan = (usize, usize);

pub struct TextTokenizer {
    pub inner: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub(crate) eos_token: Option<String>,
    /// The id appended after a trained answer when the format has no template of its own.
    pub eos_id: Option<u32>,
}

/// One chat turn, with the OpenAI tool-calling fields that chat templates read.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls (`[{id, type: "function", function: {name, arguments}}]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// A tool turn's answer to the call with this id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.to_string(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and friends from a model folder.
    pub fn from_hf_dir(dir: &Path) -> Result<TextTokenizer> {
        let tj = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&tj)
            .map_err(|e| Error::caused(Area::Tokenizer, tj.display().to_string(), e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::caused(Area::Tokenizer, cfg_path.display().to_string(), e))?,
            Err(_) => Value::Null,
        };
        let mut chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: the one named "default" is what transformers uses.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        let bos_token = token_string(cfg.get("bos_token"));
        let eos_token = token_string(cfg.get("eos_token"));
        let eos_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        Ok(TextTokenizer {
            inner,
            chat_template,
            bos_token,
            eos_token,
            eos_id,
        })
    }

    /// Builds the tokenizer that a GGUF file describes in its metadata.
    pub fn from_gguf(
        md: &HashMap<String, candle_core::quantized::gguf_file::Value>,
    ) -> Result<TextTokenizer> {
        let get = |k: &str| {
            md.get(k)
                .ok_or_else(|| Error::Tokenizer(format!("GGUF metadata has no {k:?}")))
        };
        let model = get("tokenizer.ggml.model")?.to_string()?.clone();
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default();
        if model == "llama" && arch == "gemma3" {
            return gemma_from_gguf(md);
        }
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer model {model:?} of a {arch:?} model is not supported (supported: \
                 gpt2 byte-level BPE; llama SentencePiece for gemma3)"
            )));
        }
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "default".into());
        let tokens: Vec<String> = get("tokenizer.ggml.tokens")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()?;
        let merges: Vec<(String, String)> = get("tokenizer.ggml.merges")?
            .to_vec()?
            .iter()
            .map(|v| {
                let m = v.to_string()?;
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| candle_core::Error::Msg(format!("bad merge {m:?}")))
            })
            .collect::<candle_core::Result<_>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::caused(Area::Tokenizer, "GGUF BPE", e))?;
        let mut inner = Tokenizer::new(bpe);
        // The pre-tokenizers of Hugging Face's tokenizer.json for each llama.cpp `pre` name.
        match pre.as_str() {
            "smollm" => {
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])));
            }
            "default" | "gpt2" | "gpt-2" => {
                inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
            other => {
                return Err(Error::Tokenizer(format!(
                    "GGUF tokenizer pre-type {other:?} is not supported (supported: smollm, gpt-2, default)"
                )))
            }
        }
        inner.with_decoder(Some(ByteLevel::default()));
        if let Some(types) = md.get("tokenizer.ggml.token_type") {
            let special: Vec<AddedToken> = types
                .to_vec()?
                .iter()
                .enumerate()
                // token type 3 = control (llama.cpp's LLAMA_TOKEN_TYPE_CONTROL)
                .filter(|(_, t)| t.to_i32().map(|x| x == 3).unwrap_or(false))
                .map(|(i, _)| AddedToken::from(tokens[i].clone(), true))
                .collect();
            inner
                .add_special_tokens(special)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
        }
        let id_token = |k: &str| {
            md.get(k)
                .and_then(|v| v.to_u32().ok())
                .and_then(|i| tokens.get(i as usize).cloned())
        };
        let eos_token = id_token("tokenizer.ggml.eos_token_id");
        let eos_id = md
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok());
        Ok(TextTokenizer {
            inner,
            chat_template: md
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok().cloned()),
            bos_token: id_token("tokenizer.ggml.bos_token_id"),
            eos_token,
            eos_id,
        })
    }

    /// Renders messages through the chat template, as `apply_chat_template(tokenize=False)` does.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_chat_with_tools(messages, None, add_generation_prompt)
    }

    /// Whether the chat template reads a `tools` list (transformers passes one to every
    /// template; those that never mention it would drop it silently).
    pub(crate) fn template_takes_tools(&self) -> bool {
        self.chat_template
            .as_deref()
            .is_some_and(|t| t.contains("tools"))
    }

    /// [`TextTokenizer::render_chat`] with the OpenAI `tools` list the template may render.
    pub(crate) fn render_chat_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Tokenizer(
                "the model has no chat template, so chat-format data (messages, sharegpt) cannot \
                 be rendered; use the alpaca, prompt_completion or text format"
                    .into(),
            )
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| Error::caused(Area::Tokenizer, "chat template does not parse", e))?;
        let tmpl = env.get_template("chat").expect("just added");
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::caused(Area::Tokenizer, "chat template failed", e))
    }

    /// Token ids and the byte span of each token in `text` (special tokens are matched, nothing added).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special: bool,
    ) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text, false)?.0)
    }

    /// A raw prompt's ids, with the special tokens the tokenizer adds to a text (Gemma's BOS),
    /// as transformers' `tokenizer(prompt)` and llama.cpp's completion give them; a rendered
    /// chat template writes its own and goes through [`TextTokenizer::encode`].
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text, true)?.0)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

/// Gemma's SentencePiece BPE rebuilt from GGUF metadata, as transformers builds it from the same
/// file (`integrations/gguf/gguf_tokenizer_mapping.py`, `gemma_tokenizer`, with `GemmaTokenizer`'s
/// pipeline): spaces normalized to `▁`, no prefix space, byte fallback to `<0xNN>` tokens,
/// control tokens special, user-defined ones (`\n`, `</div>`, …) matched whole, BOS prepended
/// when `tokenizer.ggml.add_bos_token` (or absent) says so. The file has no merges: they are
/// recovered from the vocabulary, every split of a token into two tokens, ranked by the merged
/// token's position in the file (Gemma's scores do not follow its merge order).
fn gemma_from_gguf(
    md: &HashMap<String, candle_core::quantized::gguf_file::Value>,
) -> Result<TextTokenizer> {
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence as DecoderSequence;
    use tokenizers::normalizers::replace::Replace;
    use tokenizers::processors::template::TemplateProcessing;

    let strings = |key: &str| -> Result<Vec<String>> {
        md.get(key)
            .ok_or_else(|| Error::Tokenizer(format!("GGUF metadata has no {key:?}")))?
            .to_vec()?
            .iter()
            .map(|v| Ok(v.to_string()?.clone()))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|t| t.to_i32())
            .collect::<candle_core::Result<_>>()?,
        None => Vec::new(),
    };
    // Tokens of only whitespace with a space are stored with real spaces; the normalizer turns
    // spaces into ▁, so they are looked up as ▁ runs.
    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.trim().is_empty() {
                "▁".repeat(t.chars().count())
            } else {
                t.clone()
            }
        })
        .collect();
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(spelled.len());
    for (id, t) in spelled.iter().enumerate() {
        // a repeated spelling keeps its last id, as a Python dict built in order does
        vocab.insert(t.clone(), id as u32);
    }
    let merges = merges_from_vocab(&spelled, &vocab);
    let unk = md
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.to_u32().ok())
        .and_then(|i| tokens.get(i as usize).cloned())
        .unwrap_or_else(|| "<unk>".into());
    let bpe = BPE::builder()
        .vocab_and_merges(
            vocab
                .iter()
                .map(|(t, &i)| (t.clone(), i))
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| Error::caused(Area::Tokenizer, "GGUF SentencePiece BPE", e))?;
    let mut inner = Tokenizer::new(bpe);
    let tok_err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    inner
        .with_normalizer(Some(Replace::new(" ", "▁").map_err(tok_err)?))
        .map_err(tok_err)?;
    inner.with_decoder(Some(DecoderSequence::new(vec![
        Replace::new("▁", " ").map_err(tok_err)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));
    // llama.cpp's token types: 3 control, 4 user-defined
    let of_type = |ty: i32| {
        tokens
            .iter()
            .zip(&types)
            .filter(move |(_, &t)| t == ty)
            .map(|(token, _)| token)
    };
    let control: Vec<AddedToken> = of_type(3)
        .map(|t| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    inner.add_special_tokens(control).map_err(tok_err)?;
    let user: Vec<AddedToken> = of_type(4)
        .filter(|t| vocab.contains_key(*t))
        .map(|t| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    inner.add_tokens(user).map_err(tok_err)?;

    let id_of = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
    let token_of = |key: &str| id_of(key).and_then(|i| tokens.get(i as usize).cloned());
    let bos_token = token_of("tokenizer.ggml.bos_token_id");
    let add_bos = md
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    if let (true, Some(bos), Some(bos_id)) =
        (add_bos, &bos_token, id_of("tokenizer.ggml.bos_token_id"))
    {
        let template = TemplateProcessing::builder()
            .try_single(format!("{bos}:0 $A:0"))
            .and_then(|t| t.try_pair(format!("{bos}:0 $A:0 {bos}:1 $B:1")))
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .special_tokens(vec![(bos.clone(), bos_id)])
            .build()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_post_processor(Some(template));
    }
    Ok(TextTokenizer {
        inner,
        chat_template: md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned()),
        bos_token,
        eos_token: token_of("tokenizer.ggml.eos_token_id"),
        eos_id: id_of("tokenizer.ggml.eos_token_id"),
    })
}

/// BPE merges implied by a SentencePiece vocabulary (transformers' `generate_merges` with the
/// file position as score): for each token in file order, every split into two vocabulary
/// tokens, the splits of one token ordered by their parts' ids; then all of them ranked by the
/// merged token's id, longer left parts first (a stable sort, so ties keep that order).
fn merges_from_vocab(spelled: &[String], vocab: &HashMap<String, u32>) -> Vec<(String, String)> {
    struct Merge {
        left: String,
        right: String,
        /// The merged token's (last) id: lower ranks first.
        rank: u32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut seen = std::collections::HashSet::with_capacity(spelled.len());
    let mut merges: Vec<Merge> = Vec::new();
    for token in spelled {
        if !seen.insert(token.as_str()) {
            continue;
        }
        let rank = vocab[token];
        let bounds: Vec<usize> = token.char_indices().map(|(i, _)| i).skip(1).collect();
        let mut local: Vec<(u32, u32, Merge)> = Vec::new();
        for at in bounds {
            let (l, r) = token.split_at(at);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((
                    li,
                    ri,
                    Merge {
                        left: l.to_string(),
                        right: r.to_string(),
                        rank,
                        left_chars: l.chars().count(),
                        right_chars: r.chars().count(),
                    },
                ));
            }
        }
        local.sort_by_key(|(li, ri, _)| (*li, *ri));
        merges.extend(local.into_iter().map(|(_, _, m)| m));
    }
    // transformers sorts by (score, len(left), len(right)) descending with score = −id
    merges.sort_by(|a, b| {
        a.rank
            .cmp(&b.rank)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    merges.into_iter().map(|m| (m.left, m.right)).collect()
}
