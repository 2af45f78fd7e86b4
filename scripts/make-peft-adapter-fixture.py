"""An adapter trained by PEFT itself, for the test that uploads it to qtune and chats with it.

On the tiny random Llama of tests/fixtures/families/llama: PEFT 0.21.2 wraps it in a LoRA (rank 4,
alpha 8, rsLoRA, on q_proj, v_proj, o_proj, up_proj and down_proj), trains it with torch's AdamW
for 30 steps to continue two fixed texts, and saves it with `save_pretrained` (PEFT's own
adapter_config.json and adapter_model.safetensors). Then transformers + PEFT continue a prompt
greedily (`generate(do_sample=False)`) with the adapter and without it; expected.json keeps both
continuations as token ids and as the text the tokenizer decodes them to.
tests/it/adapters.rs uploads the adapter over the same base and must answer the adapter's text.

Run by hand (not in CI), in the reference venv (see scripts/make-preference-fixtures.py):

    ~/.cache/qtune-reference/venv/bin/python scripts/make-peft-adapter-fixture.py tests/fixtures/peft-adapter
"""

import json
import os
import sys

import peft
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.join(HERE, "..", "tests", "fixtures", "families", "llama")
PROMPT = "the cat sat"
NEW_TOKENS = 12
TEXTS = ["the cat sat on the mat and purred all day", "the cat sat by the door waiting"]


def main(out):
    torch.manual_seed(3)
    tok = transformers.AutoTokenizer.from_pretrained(BASE)
    base = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    prompt = tok(PROMPT, return_tensors="pt")

    def continuation(model):
        with torch.no_grad():
            ids = model.generate(
                **prompt, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0
            )[0, prompt["input_ids"].shape[1]:].tolist()
        return {"ids": ids, "text": tok.decode(ids, skip_special_tokens=True)}

    plain = continuation(base)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(base, config)
    batch = [torch.tensor([tok(t)["input_ids"]]) for t in TEXTS]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for step in range(30):
        ids = batch[step % len(batch)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    adapted = continuation(model)
    assert adapted["ids"] != plain["ids"], "the adapter changes the answer"
    model.save_pretrained(out)
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(
            {
                "prompt": PROMPT,
                "max_tokens": NEW_TOKENS,
                "with_adapter": adapted,
                "base": plain,
                "final_loss": loss.item(),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
            },
            f,
            indent=1,
        )
    print(json.dumps({"with_adapter": adapted, "base": plain, "loss": loss.item()}))


if __name__ == "__main__":
    main(sys.argv[1])
