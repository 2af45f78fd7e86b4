"""Reference fixtures for preference training (DPO, IPO, RPO, ORPO), made by TRL itself.

On the tiny random Llama of tests/fixtures/families/llama, with a PEFT LoRA on all seven linears
whose A and B are drawn (not PEFT's zero B, so that the policy differs from the reference), for
one batch of four pairs of token ids (prompts and answers of different lengths): TRL's loss for
each method, every LoRA gradient of that loss, TRL's logged reward metrics, and each pair's
summed (DPO) or mean (ORPO) answer log-probabilities under the policy and the reference.
tests/it/preference.rs compares qtune's engine with these.

    DPOTrainer._compute_loss   sigmoid (beta 0.1), ipo (beta 0.1), sigmoid + sft (RPO, alpha 0.5)
    ORPOTrainer.get_batch_loss_metrics   beta 0.1

The reference is the base with the adapter switched off, as TRL does for a PEFT model with no
ref_model. Run by hand (not in CI), in the reference venv (README of scripts: "Preference
fixtures"):

    python3 -m venv ~/.cache/qtune-reference/venv
    ~/.cache/qtune-reference/venv/bin/pip install torch==2.15.0 transformers==5.24.0 \
        peft==0.21.2 trl==1.16.0 datasets safetensors==0.8.0 tokenizers==0.23.3 accelerate==1.15.0
    ~/.cache/qtune-reference/venv/bin/python scripts/make-preference-fixtures.py tests/fixtures/preference

With `--smollm2=DIR --float64` (DIR the folder ../shared/reference/convert_smollm2.py makes) it
makes the same fixture for SmolLM2-135M-Instruct in tests/fixtures/preference-smollm2 (an adapter
on q and v, rank 2; tests/it/methods.rs's full-tier test loads the GGUF the folder was made from).
`--float64` runs TRL's code on the model in float64: the exact values of the same computation,
against which both float32 implementations are measured (TRL's own float32 run is off them by up
to 8.2e-5 in norm, 1.8e-4 elementwise, on this 30-layer model; see the test).

With `--qtune=PATH` (a built qtune binary) it checks the other direction instead: qtune trains a
DPO adapter and evaluates it on held-out pairs; PEFT loads the adapter and TRL's own evaluation
(the base as reference) must report the same loss, reward accuracy and margins.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
import peft
import trl
from datasets import Dataset
from safetensors.torch import save_file
from trl import DPOConfig, DPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.join(HERE, "..", "tests", "fixtures", "families", "llama")
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 300
FIRST_ID = 3  # after the tokenizer's special tokens

# (prompt, chosen, rejected) lengths: answers of different lengths, prompts too
SHAPES = [(5, 3, 4), (3, 5, 2), (6, 2, 2), (4, 4, 6)]


def pairs():
    g = torch.Generator().manual_seed(7)
    ids = lambda n: torch.randint(FIRST_ID, VOCAB, (n,), generator=g).tolist()
    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in SHAPES]


DTYPE = torch.float32


def base_model():
    return transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=DTYPE)


LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LINEARS)


def draw_adapter(model):
    """A and B drawn, after the trainer made its adapter (TRL takes an adapter handed to it
    already made as one to continue, and its starting copy as the reference)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def answer_logps(model, batch):
    """Each pair's summed and mean answer log-probabilities: [(chosen, rejected, n_c, n_r)]."""
    out = []
    with torch.no_grad():
        for b in batch:
            row = []
            for key in ("chosen_ids", "rejected_ids"):
                ids = torch.tensor([b["prompt_ids"] + b[key]])
                logits = model(input_ids=ids).logits[0, :-1]
                logp = torch.log_softmax(logits.double(), -1).gather(1, ids[0, 1:, None])[:, 0]
                row.append(logp[len(b["prompt_ids"]) - 1:].sum().item())
            out.append({"chosen": row[0], "rejected": row[1],
                        "chosen_tokens": len(b["chosen_ids"]), "rejected_tokens": len(b["rejected_ids"])})
    return out


def grads_of(model):
    return {
        # PEFT's saved name: base_model.model.….lora_A.weight (the adapter name dropped)
        "grad." + name.replace(".default", ""): p.grad.detach().clone()
        for name, p in model.named_parameters() if p.requires_grad
    }


def dummy_dataset():
    return Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])


def tokenizer():
    tok = transformers.AutoTokenizer.from_pretrained(BASE)
    tok.pad_token = tok.eos_token
    return tok


def dpo_case(name, batch, work, **config):
    args = DPOConfig(output_dir=os.path.join(work, name), report_to=[], per_device_train_batch_size=len(batch),
                     use_cpu=True, bf16=False, **config)
    trainer = DPOTrainer(model=base_model(), args=args, train_dataset=dummy_dataset(), processing_class=tokenizer(),
                         peft_config=peft.LoraConfig(**LORA))
    model = trainer.model.to(DTYPE)
    assert "ref" not in model.peft_config, "the reference must be the base with the adapter off"
    draw_adapter(model)
    model.train()
    inputs = trainer.data_collator(batch)
    loss = trainer._compute_loss(model, inputs, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    return model, loss.item(), metrics, grads_of(model)


def orpo_case(batch, work, beta):
    args = ORPOConfig(output_dir=os.path.join(work, "orpo"), report_to=[], beta=beta,
                      per_device_train_batch_size=len(batch), use_cpu=True, bf16=False)
    tok = tokenizer()
    trainer = ORPOTrainer(model=base_model(), args=args, train_dataset=dummy_dataset(), processing_class=tok,
                          peft_config=peft.LoraConfig(**LORA))
    model = trainer.model.to(DTYPE)
    draw_adapter(model)
    model.train()
    rows = {}
    for side in ("chosen", "rejected"):
        seqs = [b["prompt_ids"] + b[f"{side}_ids"] for b in batch]
        width = max(len(s) for s in seqs)
        rows[f"{side}_input_ids"] = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        rows[f"{side}_attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        rows[f"{side}_labels"] = torch.tensor([
            [-100] * len(b["prompt_ids"]) + b[f"{side}_ids"] + [-100] * (width - len(s))
            for b, s in zip(batch, seqs)
        ])
    loss, metrics = trainer.get_batch_loss_metrics(model, rows, train_eval="train")
    loss.backward()
    rewards = {k: v for k, v in metrics.items() if k.startswith("rewards/")}
    return model, loss.item(), rewards, grads_of(model)


# 20 steps of each method from the same start, on the same four text pairs (one batch of all
# four per step, so no data order can differ), with TRL's whole pipeline: its tokenization of
# the text, its trainer, torch's AdamW
CURVE_PAIRS = [
    {"prompt": "Q: capital of France?\nA:", "chosen": " Paris.", "rejected": " Rome, I think."},
    {"prompt": "Q: 2 + 2?\nA:", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Q: colour of the sky?\nA:", "chosen": " Blue.", "rejected": " Green."},
    {"prompt": "Q: opposite of hot?\nA:", "chosen": " Cold.", "rejected": " Warm, mostly."},
]
CURVE_STEPS = 20
CURVE_LR = 2e-3


def curve(name, work):
    """TRL's per-step loss and reward margin over CURVE_STEPS steps from the drawn adapter (its
    starting copy the reference, as TRL does for an adapter it is handed)."""
    logs = []

    class Keep(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                entry = {"step": state.global_step, "loss": float(logs["loss"])}
                margins = logs.get("rewards/margins")
                entry["margins"] = None if margins is None else float(margins)
                keep.append(entry)

    keep = logs
    model = base_model()
    model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    draw_adapter(model)
    common = dict(output_dir=os.path.join(work, f"curve-{name}"), report_to=[], per_device_train_batch_size=4,
                  max_steps=CURVE_STEPS, learning_rate=CURVE_LR, lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                  optim="adamw_torch", beta=0.1,
                  # TRL's configs default to bf16 autocast where the CPU has it: float32 here, as qtune
                  bf16=False)
    data = Dataset.from_list(CURVE_PAIRS)
    if name == "orpo":
        args = ORPOConfig(max_length=64, **common)
        trainer = ORPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer(),
                              callbacks=[Keep()])
    else:
        args = DPOConfig(loss_type=[{"dpo_sigmoid": "sigmoid", "dpo_ipo": "ipo"}[name]], max_length=64, **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer(),
                             callbacks=[Keep()])
    trainer.train()
    return logs


HELD_OUT = [
    {"prompt": "Q: capital of Italy?\nA:", "chosen": " Rome.", "rejected": " Paris."},
    {"prompt": "Q: 3 + 3?\nA:", "chosen": " 6", "rejected": " 7"},
    {"prompt": "Q: colour of grass?\nA:", "chosen": " Green.", "rejected": " Blue."},
    {"prompt": "Q: opposite of up?\nA:", "chosen": " Down.", "rejected": " Left."},
]


def check_qtune_adapter(qtune):
    """qtune trains a DPO adapter (its reference the base) and evaluates it on held-out pairs;
    PEFT loads that adapter unchanged and TRL's own evaluation, with the base as its reference
    model, must give the reward accuracy and mean margin qtune reported."""
    with tempfile.TemporaryDirectory() as work:
        def write(name, rows):
            path = os.path.join(work, name)
            with open(path, "w") as f:
                f.write("\n".join(json.dumps(r) for r in rows))
            return path
        spec = {
            "base_model": os.path.abspath(BASE),
            "dataset": {"url": write("train.jsonl", CURVE_PAIRS), "validation_url": write("held.jsonl", HELD_OUT)},
            "method": {"type": "dpo", "beta": 0.1},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
            "training": {"max_steps": 10, "batch_size": 4, "learning_rate": 5e-3, "lr_scheduler": "constant",
                         "max_seq_len": 64},
            "seed": 0,
        }
        with open(os.path.join(work, "spec.json"), "w") as f:
            json.dump(spec, f)
        out = os.path.join(work, "run")
        subprocess.run([qtune, "train", os.path.join(work, "spec.json"), "--output", out],
                       check=True, capture_output=True)
        rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
        reported = next(r for r in rows if r.get("eval_loss") is not None)
        model = peft.PeftModel.from_pretrained(base_model(), os.path.join(out, "adapter"))
        args = DPOConfig(output_dir=os.path.join(work, "trl"), report_to=[], per_device_eval_batch_size=len(HELD_OUT),
                         use_cpu=True, bf16=False, beta=0.1, max_length=64)
        trainer = DPOTrainer(model=model, ref_model=base_model(), args=args, train_dataset=Dataset.from_list(CURVE_PAIRS),
                             eval_dataset=Dataset.from_list(HELD_OUT), processing_class=tokenizer())
        trl_metrics = trainer.evaluate()
        for ours, theirs in [("eval_loss", "eval_loss"), ("eval_rewards/accuracies", "eval_rewards/accuracies"),
                             ("eval_rewards/margins", "eval_rewards/margins"), ("eval_rewards/chosen", "eval_rewards/chosen")]:
            a, b = reported[ours], trl_metrics[theirs]
            print(f"  {ours}: qtune {a:.6f}, TRL on the PEFT-loaded adapter {b:.6f}")
            assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (ours, a, b)
        print("qtune's DPO adapter, loaded by PEFT, evaluates in TRL as qtune reported")


def main(out, curves=True):
    os.makedirs(out, exist_ok=True)
    batch = pairs()
    expected = {"pairs": batch, "cases": {}}
    tensors = {}
    with tempfile.TemporaryDirectory() as work:
        cases = {
            "dpo_sigmoid": dict(beta=0.1, loss_type=["sigmoid"]),
            "dpo_ipo": dict(beta=0.1, loss_type=["ipo"]),
            "dpo_rpo": dict(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
        }
        for name, config in cases.items():
            model, loss, metrics, grads = dpo_case(name, batch, work, **config)
            case = {"loss": loss, "metrics": metrics}
            if name == "dpo_sigmoid":
                expected["policy"] = answer_logps(model, batch)
                with model.disable_adapter():
                    expected["reference"] = answer_logps(model, batch)
                # float32 whatever DTYPE is (the drawn factors are float32 values)
                model.to(torch.float32).save_pretrained(os.path.join(out, "adapter"), selected_adapters=["default"])
                os.remove(os.path.join(out, "adapter", "README.md"))  # PEFT's model card
            expected["cases"][name] = case
            tensors.update({f"{name}.{k}": v for k, v in grads.items()})
            print(f"{name}: loss {loss:.6f} {metrics}")
        model, loss, metrics, grads = orpo_case(batch, work, beta=0.1)
        expected["cases"]["orpo"] = {"loss": loss, "metrics": metrics}
        tensors.update({f"orpo.{k}": v for k, v in grads.items()})
        print(f"orpo: loss {loss:.6f} {metrics}")
        expected["curves"] = {"pairs": CURVE_PAIRS, "steps": CURVE_STEPS, "learning_rate": CURVE_LR}
        for name in ("dpo_sigmoid", "dpo_ipo", "orpo") if curves else ():
            expected["curves"][name] = curve(name, work)
            print(f"{name} curve: {[round(e['loss'], 4) for e in expected['curves'][name]]}")
    expected["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__, "trl": trl.__version__}
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, os.path.join(out, "expected.safetensors"))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--qtune=")]
    qtune = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--qtune=")), None)
    smollm2 = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--smollm2=")), None)
    if "--float64" in args:
        DTYPE = torch.float64
    args = [a for a in args if not a.startswith("--smollm2=") and a != "--float64"]
    if smollm2:
        # the real model (the float32 folder convert_smollm2.py makes from the PyPI GGUF, which
        # the test loads itself): a smaller adapter, ids from its whole vocabulary, no curves
        BASE, VOCAB, FIRST_ID = smollm2, 49152, 100
        LORA.update(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
        main(args[0] if args else os.path.join(HERE, "..", "tests", "fixtures", "preference-smollm2"), curves=False)
    elif qtune:
        check_qtune_adapter(qtune)
    else:
        main(args[0] if args else os.path.join(HERE, "..", "tests", "fixtures", "preference"))
