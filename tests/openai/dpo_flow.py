"""DPO through qtune's OpenAI-compatible API with the official `openai` SDK, the way a team that
leaves OpenAI's fine-tuning brings its preference data: OpenAI's own preference file format
(`input`, `preferred_output`, `non_preferred_output`), a supervised job first, then
`method={"type": "dpo", ...}` from its fine_tuned_model (the usual recipe), events with the
reward metrics, checkpoints, and a chat with the result. Bad preference files are refused
before any job exists, naming the line. Run by tests/it/full/openai_sdk.rs; every check is an
assert.

Environment: OPENAI_BASE_URL (…/v1), QTUNE_KEY_A (an API key of the server), QTUNE_MODEL (a
base model the server allows), QTUNE_WORK (a scratch directory).
"""

import json
import os
import time

import openai
from openai import OpenAI

BASE_URL = os.environ["OPENAI_BASE_URL"]
MODEL = os.environ["QTUNE_MODEL"]
WORK = os.environ["QTUNE_WORK"]
a = OpenAI(base_url=BASE_URL, api_key=os.environ["QTUNE_KEY_A"], max_retries=0)
LORA = {"r": 4, "dropout": 0.0, "target_modules": "all-linear"}

SFT = [
    {"messages": [{"role": "user", "content": f"say {i % 4}"}, {"role": "assistant", "content": f"ok {i % 4}"}]}
    for i in range(8)
]
PREFERENCE = [
    {
        "input": {"messages": [{"role": "user", "content": f"say {i % 4}"}]},
        "preferred_output": [{"role": "assistant", "content": f"ok {i % 4}"}],
        "non_preferred_output": [{"role": "assistant", "content": f"no {(i + 1) % 4}"}],
    }
    for i in range(8)
]


def write(name, records):
    path = os.path.join(WORK, name)
    with open(path, "w") as f:
        f.write("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def upload(path):
    with open(path, "rb") as f:
        return a.files.create(file=f, purpose="fine-tune")


def wait(job_id, within=300.0):
    start = time.time()
    while True:
        job = a.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        assert time.time() - start < within, f"job {job_id} still {job.status} after {within}s"
        time.sleep(0.1)


def expect_error(kind, param, call):
    try:
        call()
    except kind as e:
        assert e.param == param, f"{kind.__name__}: param {e.param!r}, expected {param!r}: {e}"
        return e
    raise AssertionError(f"expected {kind.__name__} naming {param}")


sft_file = upload(write("sft.jsonl", SFT))
sft = a.fine_tuning.jobs.create(
    model=MODEL, training_file=sft_file.id,
    extra_body={"qtune": {"lora": LORA, "training": {"max_steps": 4, "learning_rate": 0.01}}},
)
sft = wait(sft.id)
assert sft.status == "succeeded", sft
assert sft.to_dict()["method"]["type"] == "supervised", sft

pairs = upload(write("preference.jsonl", PREFERENCE))
dpo = a.fine_tuning.jobs.create(
    model=sft.fine_tuned_model,
    training_file=pairs.id,
    method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 4, "n_epochs": 2}}},
    extra_body={"qtune": {"checkpoint_every_steps": 2, "training": {"learning_rate": 0.01}}},
)
method = dpo.to_dict()["method"]
assert method["type"] == "dpo", method
assert method["dpo"]["hyperparameters"]["beta"] == 0.2, method
assert method["dpo"]["hyperparameters"]["batch_size"] == 4, method
assert dpo.model == MODEL, dpo  # it continues the supervised adapter on the same base
done = wait(dpo.id)
assert done.status == "succeeded", done
assert done.fine_tuned_model, done

# events: every step's loss with TRL's reward metrics
events = a.fine_tuning.jobs.list_events(dpo.id, limit=100).data
steps = [e.data for e in events if e.type == "metrics" and e.data and "train_loss" in e.data]
assert len(steps) == 4, steps
for s in steps:
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert isinstance(s.get(key), float), (key, s)
    assert 0.0 <= s["rewards/accuracies"] <= 1.0, s
    assert abs(s["rewards/margins"] - (s["rewards/chosen"] - s["rewards/rejected"])) < 1e-9, s

checkpoints = a.fine_tuning.jobs.checkpoints.list(dpo.id).data
assert sorted(c.step_number for c in checkpoints) == [2, 4], checkpoints

reply = a.chat.completions.create(
    model=done.fine_tuned_model, messages=[{"role": "user", "content": "say 1"}], max_tokens=6, temperature=0
)
assert reply.choices[0].message.content, reply

# a malformed preference line: refused before any job exists, naming the line
bad = dict(PREFERENCE[0])
del bad["non_preferred_output"]
bad_file = upload(write("bad.jsonl", [PREFERENCE[1], bad]))
e = expect_error(
    openai.BadRequestError,
    "training_file",
    lambda: a.fine_tuning.jobs.create(model=MODEL, training_file=bad_file.id, method={"type": "dpo"}),
)
assert "line 2" in str(e) and "non_preferred_output" in str(e), e
# supervised data under dpo, and pairs under supervised training: each refused, naming the file
e = expect_error(
    openai.BadRequestError,
    "training_file",
    lambda: a.fine_tuning.jobs.create(model=MODEL, training_file=sft_file.id, method={"type": "dpo"}),
)
assert "preference" in str(e), e
expect_error(openai.BadRequestError, "training_file", lambda: a.fine_tuning.jobs.create(model=MODEL, training_file=pairs.id))
expect_error(
    openai.BadRequestError,
    "method.dpo.hyperparameters.beta",
    lambda: a.fine_tuning.jobs.create(
        model=MODEL, training_file=pairs.id, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}
    ),
)
expect_error(
    openai.BadRequestError,
    "method.type",
    lambda: a.fine_tuning.jobs.create(model=MODEL, training_file=pairs.id, method={"type": "reinforcement"}),
)
print("openai SDK", openai.__version__, "dpo flow passed:", dpo.id, "margins", [round(s["rewards/margins"], 4) for s in steps])
