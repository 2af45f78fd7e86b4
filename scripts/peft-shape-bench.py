#!/usr/bin/env python3
"""PyTorch + transformers + PEFT at SmolLM2's larger shapes (random weights, like `qtune bench
--shape`): one LoRA step's tokens/s and the process's peak RSS, float32, 2 threads, q,k,v,o,
r 16, alpha 32, dropout 0.05, AdamW lr 2e-4, no gradient checkpointing, random token ids.
Run with the reference venv's python (bench/reference/setup_venv.sh); prints one JSON line.

    python peft-shape-bench.py --shape 360m|1.7b [--batch 1] [--seq 512] [--warmup 1] [--steps 3]
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
import argparse
import json
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

# the shapes of HuggingFaceTB/SmolLM2-360M and -1.7B's config.json (as qtune's random_model.rs)
SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                 num_attention_heads=15, num_key_value_heads=5, rope_theta=100000.0),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=32, num_key_value_heads=32, rope_theta=130000.0),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, use_cache=False, **SHAPES[a.shape])
    model = LlamaForCausalLM(cfg).float()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    steps = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            steps.append(time.perf_counter() - t0)
        del out
    med = statistics.median(steps)
    print(json.dumps({"shape": a.shape, "batch": a.batch, "seq": a.seq, "median_step_s": med,
                      "tokens_per_s": a.batch * a.seq / med,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "attn_implementation": model.base_model.model.config._attn_implementation}))


if __name__ == "__main__":
    main()
