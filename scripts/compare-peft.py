#!/usr/bin/env python3
"""qtune beside PyTorch + PEFT, in one sitting on this machine: the LoRA step at SmolLM2-135M's
shape, 4 x 256, 2 threads, the two tools' runs alternating, and the medians and ratios printed
with the CPU model and its matrix flags. Figures from another machine or another sitting are not
a comparison; these are.

Configurations (each a pair of runs per round, qtune first on odd rounds and PEFT first on even):
  f32      q,k,v,o, float32                  qtune bench            | peft_bench.py --config A
  f32-all  all seven linears, float32        qtune bench --all-linear | peft_bench.py --config B
  bf16     q,k,v,o, bf16 frozen weights      qtune bench --bf16     | peft_bf16_bench.py bf16weights
  360m     SmolLM2-360M's shape, 1 x 512     qtune bench --shape 360m | scripts/peft-shape-bench.py
  1.7b     SmolLM2-1.7B's shape, 1 x 512     qtune bench --shape 1.7b | scripts/peft-shape-bench.py
  epoch    one real-data epoch: 900 chat examples (--epoch-rows) from the standard library's
           docstrings (scripts/make-docstring-chat.py), batch 8, max_seq_len 512, float32, q,k,v,o r 16:
           `qtune train` (packing; timed from start to exit, loading included) | Trainer + PEFT
           with dynamic padding and length grouping (peft_epoch.py; its training alone timed)

Setup (once; about 3 GB): the reference scripts of bench/reference are copied to
~/.cache/qtune-peft-reference, their venv is made by their setup_venv.sh, and their
convert_smollm2.py turns the SmolLM2 GGUF into the Hugging Face folder PEFT loads.

    cargo build --release
    python3 scripts/compare-peft.py [--rounds 3] [--configs f32,bf16,f32-all] [--qtune target/release/qtune]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
REFERENCE_SRC = os.path.join(REPO, "bench", "reference")
REFERENCE = os.path.expanduser("~/.cache/qtune-peft-reference")


def cpu():
    model, flags = "unknown CPU", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    matrix = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f", "avx512_vnni", "avx2", "fma")))
    return model, matrix


def setup():
    if not os.path.isdir(REFERENCE):
        shutil.copytree(REFERENCE_SRC, REFERENCE)
    py = os.path.join(REFERENCE, ".venv", "bin", "python")
    fixtures_venv = os.path.expanduser("~/.cache/qtune-reference/venv")
    if not os.path.exists(py) and os.path.isdir(fixtures_venv):
        # the fixture scripts' venv has the same pins; setup_venv.sh adds what it lacks
        os.symlink(fixtures_venv, os.path.join(REFERENCE, ".venv"))
    subprocess.run(["bash", "setup_venv.sh"], cwd=REFERENCE, check=True)
    if not os.path.exists(os.path.join(REFERENCE, "models", "smollm2-135m-instruct", "model.safetensors")):
        subprocess.run([py, "convert_smollm2.py"], cwd=REFERENCE, check=True)
    return py


def run_json(cmd, cwd, marker=None):
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    if marker:
        lines = [l[len(marker):] for l in lines if l.startswith(marker)]
    else:
        lines = [l for l in lines if l.startswith("{")]
    if p.returncode != 0 or not lines:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads(lines[-1])


def qtune_run(qtune, flags):
    r = run_json([qtune, "bench", "--json", *flags], REPO)
    return r["tokens_per_second"], r["peak_rss_bytes"] / 2**20


# the larger shapes: one sequence of 512, fewer steps (a 1.7B step takes most of a minute here)
SCALE_RUN = ["--batch", "1", "--seq", "512", "--warmup", "1", "--steps", "3"]


def peft_run(py, config):
    if config in ("360m", "1.7b"):
        r = run_json([py, os.path.join(HERE, "peft-shape-bench.py"), "--shape", config, *SCALE_RUN], REPO)
    elif config in ("A", "B"):
        r = run_json([py, "peft_bench.py", "--worker", "--config", config, "--batch", "4",
                      "--seq", "256", "--warmup", "3", "--steps", "5"], REFERENCE, "RESULT ")
    else:
        r = run_json([py, "peft_bf16_bench.py", "bf16weights"], REFERENCE)
    return r["tokens_per_s"], r["peak_rss_mib"]


CONFIGS = {
    "f32": ([], "A"),
    "f32-all": (["--all-linear"], "B"),
    "bf16": (["--bf16"], "bf16"),
    "360m": (["--shape", "360m", *SCALE_RUN], "360m"),
    "1.7b": (["--shape", "1.7b", *SCALE_RUN], "1.7b"),
}

def epoch_data(rows):
    path = os.path.join(REFERENCE, "results", f"docstring-chat-{rows}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    made = subprocess.run([sys.executable, os.path.join(HERE, "make-docstring-chat.py"), path,
                           "--rows", str(rows)], capture_output=True, text=True, check=True)
    print(f"epoch data: {made.stdout.strip()}")
    return path


def qtune_epoch(qtune, model_dir, data):
    """Wall seconds of `qtune train` from start to exit, and its mean step loss."""
    spec = {
        "base_model": model_dir,
        "dataset": {"url": data, "format": "messages"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 2e-4, "lr_scheduler": "constant",
                     "max_seq_len": 512, "packing": True},
        "checkpoint_every_steps": 100000,
        "seed": 0,
    }
    with tempfile.TemporaryDirectory() as out:
        spec_path = os.path.join(out, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        t0 = time.perf_counter()
        p = subprocess.run([qtune, "train", spec_path, "--output", os.path.join(out, "run")],
                           cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"qtune train failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        rows = [json.loads(l) for l in open(os.path.join(out, "run", "metrics.jsonl")) if l.strip()]
        losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
        return wall, statistics.mean(losses)


def peft_epoch(py, model_dir, data):
    r = run_json([py, "peft_epoch.py", model_dir, data, "--batch", "8", "--max-len", "512",
                  "--group-by-length"], REFERENCE)
    return r["train_seconds"], r["train_loss"], r["real_tokens"]


def compare_epoch(py, qtune, rounds, model, rows):
    model_dir = os.path.join(REFERENCE, "models", "smollm2-135m-instruct")
    data = epoch_data(rows)
    # the real (non-pad) tokens as peft_epoch.py counts them: the same chat template and
    # tokenizer as qtune's, so one count serves both
    q, p, real_tokens = [], [], None
    for i in range(rounds):
        order = [("qtune", lambda: qtune_epoch(qtune, model_dir, data)),
                 ("peft", lambda: peft_epoch(py, model_dir, data))]
        if i % 2:
            order.reverse()
        for tool, run in order:
            secs, loss, *tokens = run()
            real_tokens = tokens[0] if tokens else real_tokens
            (q if tool == "qtune" else p).append(secs)
            print(f"  epoch round {i + 1}: {tool} {secs:.0f} s, mean step loss {loss:.4f}", flush=True)
    qs, ps = statistics.median(q), statistics.median(p)
    print()
    print(f"| one epoch, {rows} examples, batch 8, max 512, {model} | qtune (packing, load included) "
          f"| Trainer + PEFT (dynamic padding, length grouping; training alone) | ratio |")
    print("|---|---|---|---|")
    print(f"| wall seconds (median of {rounds}: {', '.join(f'{x:.0f}' for x in q)} / "
          f"{', '.join(f'{x:.0f}' for x in p)}) | {qs:.0f} | {ps:.0f} | {ps / qs:.2f}x |")
    print(f"| real tokens/s ({real_tokens} real tokens) | {real_tokens / qs:.0f} | {real_tokens / ps:.0f} | |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default="f32,bf16,f32-all")
    ap.add_argument("--qtune", default=os.path.join(REPO, "target", "release", "qtune"))
    # 900 examples: qtune about 6 minutes, Trainer + PEFT 10 to 12 on 2 cores
    ap.add_argument("--epoch-rows", type=int, default=900)
    a = ap.parse_args()
    py = setup()
    # the ids peft_bench.py's workers read
    subprocess.run([py, "-c", "import peft_bench; peft_bench.make_input_ids()"], cwd=REFERENCE, check=True)
    model, matrix = cpu()
    print(f"CPU: {model}; {os.cpu_count()} cores seen, 2 threads each; flags: {' '.join(matrix) or 'none'}")
    rows = []
    names = a.configs.split(",")
    if "epoch" in names:
        compare_epoch(py, a.qtune, a.rounds, model, a.epoch_rows)
        names.remove("epoch")
    for name in names:
        flags, ref = CONFIGS[name]
        q, p = [], []
        for i in range(a.rounds):
            order = [("qtune", lambda: qtune_run(a.qtune, flags)), ("peft", lambda: peft_run(py, ref))]
            if i % 2:
                order.reverse()
            for tool, run in order:
                tps, rss = run()
                (q if tool == "qtune" else p).append((tps, rss))
                print(f"  {name} round {i + 1}: {tool} {tps:.0f} tok/s, peak RSS {rss:.0f} MiB", flush=True)
        qm = statistics.median(t for t, _ in q)
        pm = statistics.median(t for t, _ in p)
        qr = statistics.median(r for _, r in q)
        pr = statistics.median(r for _, r in p)
        rows.append((name, qm, pm, qr, pr, q, p))
    print()
    print(f"| {model} (4 x 256; 360m, 1.7b: 1 x 512) | qtune tok/s (median) | PEFT tok/s (median) | ratio | peak RSS qtune / PEFT |")
    print("|---|---|---|---|---|")
    for name, qm, pm, qr, pr, q, p in rows:
        print(f"| {name} | {qm:.0f} ({', '.join(f'{t:.0f}' for t, _ in q)}) | "
              f"{pm:.0f} ({', '.join(f'{t:.0f}' for t, _ in p)}) | {qm / pm:.2f}x | "
              f"{qr:.0f} / {pr:.0f} MiB ({qr / pr:.2f}x) |")


if __name__ == "__main__":
    main()
