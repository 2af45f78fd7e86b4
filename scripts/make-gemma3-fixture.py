"""Reference numbers for the real Gemma 3 270M, made by transformers reading the GGUF itself.

Writes tests/fixtures/gemma3-270m.json:
- `tokenization`: a few hundred varied strings (ASCII, accents, CJK, emoji, code, whitespace runs,
  control tokens, byte fallback) and the ids transformers' GGUF tokenizer gives each, with the
  BOS it adds (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, which rebuilds Gemma's
  SentencePiece BPE from the file's tokens, as qtune does);
- `greedy`: the prompt "The capital of France is" (with its BOS) and the 16 tokens transformers'
  greedy `generate` continues it with;
- `text_loss`: the base model's mean next-token loss on a fixed public-domain text, as qtune's
  `text` format labels it (BOS, the text's tokens, EOS; every token after the first a label),
  with the model loaded by `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)`.

tests/it/full/gemma3.rs compares qtune with both. Run by hand in the venv of make-family-fixtures.py
(plus `pip install gguf==0.19.0`), after scripts/fetch-test-models.sh:

    ~/.cache/qtune-reference/venv/bin/python scripts/make-gemma3-fixture.py \
        .cache/test-models/gemma-3-270m-q4_k_m.gguf tests/fixtures/gemma3-270m.json
"""

import json
import os
import random
import sys

import torch
import transformers

# The first two paragraphs of the United States Declaration of Independence (1776), public domain.
TEXT = (
    "When in the Course of human events, it becomes necessary for one people to dissolve the "
    "political bands which have connected them with another, and to assume among the powers of "
    "the earth, the separate and equal station to which the Laws of Nature and of Nature's God "
    "entitle them, a decent respect to the opinions of mankind requires that they should declare "
    "the causes which impel them to the separation.\n\n"
    "We hold these truths to be self-evident, that all men are created equal, that they are "
    "endowed by their Creator with certain unalienable Rights, that among these are Life, Liberty "
    "and the pursuit of Happiness. That to secure these rights, Governments are instituted among "
    "Men, deriving their just powers from the consent of the governed."
)

GREEDY_PROMPT = "The capital of France is"

FIXED = [
    "",
    " ",
    "  ",
    "   leading spaces",
    "trailing spaces   ",
    "Hello world",
    "Hello  world",
    "Hello\tworld\n",
    "\n\n\nthree newlines",
    "line one\r\nline two",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>",
    "<bos>not at the start",
    "<eos><pad><unk>",
    "<div class=\"x\"></div></span>",
    "naïve café résumé façade",
    "Straße, Øresund, Ærø, Œuvre",
    "日本語のテキストです。",
    "中文文本，标点符号。",
    "한국어 텍스트",
    "Привет, мир! Ёлка.",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "emoji 🤖🎉👍🏽 and 🏳️‍🌈",
    "math: ∑ᵢ xᵢ² ≤ ∞, ∀ε>0 ∃δ",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i]; }",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "https://example.com/path?query=1&other=two#frag",
    "3.14159265358979 1,000,000 -42 0x1F 1e-5",
    "ALL CAPS SENTENCE. all lower sentence.",
    "a\u0000b",
    "\u200b\u200dzero width",
    "\U0001f9ea\U0010ffff private use",
    "tab\t\ttabs",
    "   ",
    "a" * 300,
    "ab" * 100,
    "unbelievably antidisestablishmentarianism",
]

WORDS = (
    "the of and to in is was for on that with as by at from it be this an are or which "
    "model train data token loss gradient adapter Gemma weight layer attention window "
    "quick brown fox jumps over lazy dog résumé naïve 東京 北京 서울 Москва ☃ ∂ 🚀 "
    "don't can't I'm you're 2024 3.5 100% $20 #tag @user e-mail co-operate"
).split()


def strings():
    out = list(FIXED)
    rng = random.Random(0)
    seps = [" ", "  ", "\n", "\t", ", ", ". ", "", " \n "]
    while len(out) < 300:
        n = rng.randint(1, 14)
        s = ""
        for i in range(n):
            s += rng.choice(WORDS)
            if i < n - 1:
                s += rng.choice(seps)
        if rng.random() < 0.2:
            s = " " + s
        if rng.random() < 0.1:
            s = s.upper()
        out.append(s)
    return out


def main():
    gguf, out = sys.argv[1], sys.argv[2]
    folder, name = os.path.split(os.path.abspath(gguf))
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    cases = [{"text": s, "ids": tok(s).input_ids} for s in strings()]

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )
    model.eval()
    ids = tok(TEXT).input_ids + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    prompt = tok(GREEDY_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        continued = model.generate(prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1]:]
    print(f"{len(cases)} strings tokenized; text: {len(ids)} tokens, loss {loss:.6f}; "
          f"greedy: {tok.decode(continued)!r}")
    with open(out, "w") as f:
        json.dump(
            {
                "made_by": f"transformers {transformers.__version__}, torch {torch.__version__}",
                "gguf_sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                "text": TEXT,
                "text_ids": ids,
                "text_loss": loss,
                "greedy": {
                    "prompt": GREEDY_PROMPT,
                    "prompt_ids": prompt[0].tolist(),
                    "continuation_ids": continued.tolist(),
                },
                "tokenization": cases,
            },
            f,
            ensure_ascii=False,
            indent=1,
        )


if __name__ == "__main__":
    main()
