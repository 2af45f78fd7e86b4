"""Reference fixtures for each model family, made by transformers and PEFT themselves.

For every family qtune trains, builds a tiny random checkpoint with transformers (config.json,
model.safetensors, a byte-level tokenizer.json) and records, for one fixed batch: transformers'
logits and loss, and with a PEFT LoRA on all seven linears whose A and B are drawn (not PEFT's
zero B) the loss and every LoRA gradient. tests/it/families.rs compares qtune with these.

With `--qtune PATH` (a built qtune binary) it then checks the other direction for each family: qtune
trains an adapter on the fixture model, PEFT loads it (`PeftModel.from_pretrained`) and must give
the loss `qtune eval` gives on the same data.

Run by hand (not in CI), in a venv with the pinned packages (README: "Model families"):

    python3 -m venv ~/.cache/qtune-reference/venv
    ~/.cache/qtune-reference/venv/bin/pip install torch==2.15.0 transformers==5.24.0 \
        peft==0.21.2 safetensors==0.8.0 tokenizers==0.23.3 numpy==2.4.6 accelerate==1.15.0
    ~/.cache/qtune-reference/venv/bin/python scripts/make-family-fixtures.py tests/fixtures/families \
        --qtune target/release/qtune
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
import peft
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

VOCAB = 300
SEQ = 16
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer(path):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIALS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(path)


def shape(**extra):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        # larger than transformers' 0.02, so that logits and gradients are far from uniform
        initializer_range=0.15,
        dtype="float32",
    )
    base.update(extra)
    return base


FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**shape()),
    # a window shorter than the batch's rows, so that the sliding window is exercised
    "mistral": lambda: transformers.MistralConfig(**shape(sliding_window=6)),
    # qwen2: q/k/v biases, tied embeddings as the small Qwen2.5 models have them
    "qwen2": lambda: transformers.Qwen2Config(**shape(tie_word_embeddings=True)),
    # qwen3: RMSNorm on each head of q and k, no biases, a head_dim not hidden / heads
    "qwen3": lambda: transformers.Qwen3Config(**shape(head_dim=16)),
    # gemma3: a sliding layer then a global one, each with its own RoPE base (the global one
    # scaled), a window shorter than the rows, attention scaled by query_pre_attn_scalar, tied
    "gemma3": lambda: transformers.Gemma3TextConfig(**gemma3_shape()),
    # phi3: fused qkv_proj and gate_up_proj, and a sliding window
    "phi3": lambda: transformers.Phi3Config(**shape(sliding_window=6, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def gemma3_shape():
    base = shape(
        head_dim=16,
        query_pre_attn_scalar=12,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
        },
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    del base["rope_theta"]
    return base


# The modules PEFT's target_modules name in each family.
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILY_LINEARS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}


def make(family, out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    config = FAMILIES[family]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # norms away from 1 and biases away from 0, so that both are exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # gemma's norms scale by (1 + weight): their weights sit around 0
                centre = 0.0 if family == "gemma3" else 1.0
                p.copy_(centre + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    byte_tokenizer(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}, f)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(len(SPECIALS), VOCAB, (2, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt without loss
    labels[1, 9:11] = -100
    with torch.no_grad():
        out_base = model(input_ids=ids, labels=labels)

    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules=FAMILY_LINEARS.get(family, LINEARS))
    peft_model = peft.get_peft_model(model, lora)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.train()
    out_lora = peft_model(input_ids=ids, labels=labels)
    out_lora.loss.backward()
    adapter_dir = os.path.join(out, "adapter")
    peft_model.save_pretrained(adapter_dir)
    grads = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            # PEFT's saved name: base_model.model.….lora_A.weight (the adapter name dropped)
            grads["grad." + name.replace(".default", "")] = p.grad.detach().clone()
    expected = {
        "input_ids": ids.to(torch.int64),
        "labels": labels.to(torch.int64),
        "logits": out_base.logits.detach().contiguous(),
        "loss": out_base.loss.detach().reshape(1),
        "lora_loss": out_lora.loss.detach().reshape(1),
        **grads,
    }
    save_file(expected, os.path.join(out, "expected.safetensors"))
    print(f"{family}: loss {out_base.loss.item():.6f}, with LoRA {out_lora.loss.item():.6f}, {len(grads)} gradients")


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A stitch in time saves nine.",
    "Rome was not built in a day.",
    "All that glitters is not gold.",
    "Actions speak louder than words.",
    "Where there is smoke there is fire.",
]


def check_adapter_loads_in_peft(qtune, folder):
    """qtune trains an adapter on `folder`; PEFT's loss with it must equal `qtune eval`'s."""
    folder = os.path.abspath(folder)
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "data.jsonl")
        with open(data, "w") as f:
            f.write("\n".join(json.dumps({"text": t}) for t in TEXTS))
        spec = {
            "base_model": folder,
            "dataset": {"url": data, "format": "text"},
            "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.0},
            "training": {"max_steps": 4, "batch_size": 2, "learning_rate": 0.05, "max_seq_len": 64},
            "seed": 0,
        }
        with open(os.path.join(work, "spec.json"), "w") as f:
            json.dump(spec, f)
        out = os.path.join(work, "run")
        subprocess.run([qtune, "train", os.path.join(work, "spec.json"), "--output", out],
                       check=True, capture_output=True)
        adapter = os.path.join(out, "adapter")
        evaluated = subprocess.run(
            [qtune, "eval", "--model", folder, "--adapter", adapter, "--data", data,
             "--format", "text", "--max-seq-len", "64", "--json"],
            check=True, capture_output=True, text=True)
        qtune_loss = json.loads(evaluated.stdout)["loss"]

        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        eos = tok.token_to_id("<|im_end|>")
        base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, adapter)
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for text in TEXTS:
                # the `text` format: the tokens, then EOS, every token after the first a label
                ids = torch.tensor([tok.encode(text).ids + [eos]])
                logits = model(input_ids=ids).logits[0, :-1]
                total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                count += ids.shape[1] - 1
        peft_loss = total / count
        rel = abs(qtune_loss - peft_loss) / peft_loss
        status = "ok" if rel <= 1e-4 else "DIFFERS"
        print(f"  qtune's adapter in PEFT: loss {peft_loss:.6f}, qtune eval {qtune_loss:.6f} ({status})")
        if rel > 1e-4:
            sys.exit(f"{folder}: PEFT's loss with qtune's adapter differs from qtune's")


def main():
    args = sys.argv[1:]
    qtune = None
    if "--qtune" in args:
        at = args.index("--qtune")
        qtune = args[at + 1]
        del args[at:at + 2]
    root = args[0] if args else "tests/fixtures/families"
    for family in FAMILIES:
        make(family, os.path.join(root, family))
        if qtune:
            check_adapter_loads_in_peft(qtune, os.path.join(root, family))
    with open(os.path.join(root, "VERSIONS"), "w") as f:
        f.write(f"torch {torch.__version__}\ntransformers {transformers.__version__}\npeft {peft.__version__}\n")


if __name__ == "__main__":
    main()
