//! Greedy decoding, for checking a base model or an adapter by eye and in tests.

use candle_core::{Tensor, D};

use super::model::BaseModel;
use super::tokenizer::Message;
use super::Result;

/// Greedy continuation of `prompt_ids`, stopping at EOS or after `max_new_tokens`. Recomputes
/// the whole sequence each token (no KV cache): fine for short checks, not a serving path.
pub fn greedy(base: &BaseModel, prompt_ids: &[u32], max_new_tokens: usize) -> Result<Vec<u32>> {
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
        if Some(next) == base.tokenizer.eos_id {
            break;
        }
        ids.push(next);
        out.push(next);
    }
    Ok(out)
}

/// Answers one user message through the model's chat template.
pub fn chat(base: &BaseModel, user: &str, max_new_tokens: usize) -> Result<String> {
    let prompt = base.tokenizer.render_chat(
        &[Message {
            role: "user".into(),
            content: user.into(),
        }],
        true,
    )?;
    let ids = base.tokenizer.encode(&prompt)?;
    let answer = greedy(base, &ids, max_new_tokens)?;
    base.tokenizer.decode(&answer)
}
