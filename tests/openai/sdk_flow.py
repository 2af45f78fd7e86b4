"""Drives qtune's OpenAI-compatible fine-tuning API with the official `openai` SDK (pinned in
scripts/test.sh), as a team that fine-tunes through OpenAI would: nothing here knows it talks to
qtune except `base_url` and the `qtune` extra of a create. Run by tests/it/openai.rs against a
real server; every check is an assert, and the script exits non-zero at the first that fails.

Environment: OPENAI_BASE_URL (…/v1), QTUNE_KEY_A and QTUNE_KEY_B (two API keys of the server),
QTUNE_MODEL (a base model the server allows), QTUNE_WORK (a scratch directory).
"""

import csv
import io
import json
import os
import time
import typing

import jsonschema
import openai
import pydantic
from openai import OpenAI

BASE_URL = os.environ["OPENAI_BASE_URL"]
MODEL = os.environ["QTUNE_MODEL"]
WORK = os.environ["QTUNE_WORK"]
a = OpenAI(base_url=BASE_URL, api_key=os.environ["QTUNE_KEY_A"], max_retries=0)
b = OpenAI(base_url=BASE_URL, api_key=os.environ["QTUNE_KEY_B"], max_retries=0)

# What the tiny test model learns fast: its ChatML template renders developer turns as system
# turns; the first assistant answer has weight 0 (kept as context, not trained on).
RECORDS = [
    {
        "messages": [
            {"role": "developer", "content": "Answer in one word."},
            {"role": "user", "content": f"say {i % 4}"},
            {"role": "assistant", "content": "hmm", "weight": 0},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": f"ok {i % 4}", "weight": 1},
        ]
    }
    for i in range(8)
]
LORA = {"r": 4, "dropout": 0.0, "target_modules": "all-linear"}


def write(name, lines):
    path = os.path.join(WORK, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def upload(client, path):
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune")


def wait(job_id, statuses, within=120.0, until=None):
    start = time.time()
    while True:
        job = a.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses and (until is None or until(job)):
            return job
        assert time.time() - start < within, f"job {job_id} still {job.status} after {within}s"
        time.sleep(0.05)


def expect_error(kind, param, call):
    try:
        call()
    except kind as e:
        assert e.param == param, f"{kind.__name__}: param {e.param!r}, expected {param!r}: {e}"
        assert isinstance(e.body, dict) and e.body.get("message"), e.body
        return e
    raise AssertionError(f"expected {kind.__name__} naming {param}")


# --- files ---------------------------------------------------------------------------------
train_path = write("train.jsonl", [json.dumps(r) for r in RECORDS])
f = upload(a, train_path)
assert f.object == "file" and f.id.startswith("file-"), f
assert f.purpose == "fine-tune" and f.status == "uploaded", f
assert f.filename == "train.jsonl" and f.bytes == os.path.getsize(train_path), f
assert isinstance(f.created_at, int) and f.created_at > 1_700_000_000, f
assert a.files.retrieve(f.id).id == f.id
assert a.files.content(f.id).read() == open(train_path, "rb").read()
extra = [upload(a, train_path).id for _ in range(2)]
# the SDK's auto-paging iterator over files, one per page
listed = [x.id for x in a.files.list(limit=1, purpose="fine-tune")]
assert listed[:3] == list(reversed([f.id] + extra)), listed
deleted = a.files.delete(extra[0])
assert deleted.deleted and deleted.id == extra[0], deleted
expect_error(openai.NotFoundError, None, lambda: a.files.retrieve(extra[0]))

# --- a job with hyperparameters and a qtune extra, to the end ------------------------------
job = a.fine_tuning.jobs.create(
    model=MODEL,
    training_file=f.id,
    hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 50},
    suffix="sdk",
    seed=7,
    metadata={"team": "a"},
    extra_body={
        "qtune": {
            "lora": LORA,
            "dataset": {"validation_split": 0.25},
            "training": {"max_seq_len": 96, "lr_scheduler": "constant", "eval_every_steps": 2},
            "checkpoint_every_steps": 2,
        }
    },
)
assert job.object == "fine_tuning.job" and job.status == "queued", job
assert job.model == MODEL and job.training_file == f.id and job.seed == 7, job
assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 2, job
assert abs(job.hyperparameters.learning_rate_multiplier - 50) < 1e-9, job
assert job.method.type == "supervised", job
assert job.metadata == {"team": "a"}, job
# the file was checked before the job was queued
assert a.files.retrieve(f.id).status == "processed"

done = wait(job.id, {"succeeded", "failed", "cancelled"})
assert done.status == "succeeded", done
# the base as the name shows it: of a path only its last part, never where the server keeps it
SHOWN = os.path.basename(MODEL.rstrip("/")).removesuffix(".gguf")
assert done.fine_tuned_model == f"ft:{SHOWN}:sdk:{job.id}", done.fine_tuned_model
assert done.finished_at >= done.created_at and done.trained_tokens > 0, done
# 6 training examples at batch 2, 2 epochs
steps = 6

# events, newest first, through the SDK's iterator across pages of 4
pages = a.fine_tuning.jobs.list_events(job.id, limit=4)
page_count, events = 0, []
for page in pages.iter_pages():
    page_count += 1
    events.extend(page.data)
assert page_count >= 2, page_count
ids = [int(e.id.split("-")[1]) for e in events]
assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids), ids
assert len([e for e in a.fine_tuning.jobs.list_events(job.id, limit=4)]) == len(events)
metrics = [e for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
assert sorted(e.data["step"] for e in metrics) == list(range(1, steps + 1)), metrics
assert all(0.0 <= e.data["train_mean_token_accuracy"] <= 1.0 for e in metrics), metrics
assert events[0].object == "fine_tuning.job.event" and events[0].level == "info", events[0]
assert "completed" in events[0].message, events[0].message

# checkpoints with their step's metrics
checkpoints = list(a.fine_tuning.jobs.checkpoints.list(job.id, limit=1))
# every second step, and the last (the final adapter)
assert [c.step_number for c in checkpoints] == [6, 4, 2], checkpoints
for c in checkpoints:
    assert c.object == "fine_tuning.job.checkpoint" and c.fine_tuning_job_id == job.id, c
    assert c.fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-{c.step_number}"
    assert c.metrics.step == c.step_number and c.metrics.train_loss > 0, c
    assert 0.0 <= c.metrics.train_mean_token_accuracy <= 1.0, c
    assert c.metrics.valid_loss > 0 and 0.0 <= c.metrics.valid_mean_token_accuracy <= 1.0, c

# the results file: the step metrics as CSV
assert len(done.result_files) == 1
results = a.files.retrieve(done.result_files[0])
assert results.purpose == "fine-tune-results" and results.status == "processed", results
rows = list(csv.DictReader(io.StringIO(a.files.content(results.id).text)))
assert [int(r["step"]) for r in rows] == list(range(1, steps + 1)), rows
assert all(float(r["train_loss"]) > 0 and 0 <= float(r["train_accuracy"]) <= 1 for r in rows)
assert rows[1]["valid_loss"] and rows[1]["valid_mean_token_accuracy"], rows[1]
assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]), rows
assert results.bytes == len(a.files.content(results.id).read())

# --- talk to the fine-tuned model at once ---------------------------------------------------
ask = [{"role": "developer", "content": "Answer in one word."}, {"role": "user", "content": "say 1"}]
reply = a.chat.completions.create(model=done.fine_tuned_model, messages=ask, max_tokens=8, temperature=0)
assert reply.object == "chat.completion" and reply.model == done.fine_tuned_model, reply
choice = reply.choices[0]
assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length"), reply
assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 10, reply.usage
text = choice.message.content
chunks = list(
    a.chat.completions.create(
        model=done.fine_tuned_model, messages=ask, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
)
assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert streamed == text, (streamed, text)
assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens, chunks[-1]
# the job id names the same model; a seed repeats a sampled answer
by_id = a.chat.completions.create(model=job.id, messages=ask, max_tokens=8, temperature=0)
assert by_id.choices[0].message.content == text
sampled = [
    a.chat.completions.create(model=job.id, messages=ask, max_tokens=8, temperature=1.2, seed=5).choices[0].message.content
    for _ in range(2)
]
assert sampled[0] == sampled[1], sampled

# --- structured output: 50 sampled answers of the fine-tune, each valid against the schema ----
ORDER = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "enum": ["tea", "cake", "soup"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 12},
        "note": {"type": "string", "maxLength": 10},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "urgent": {"type": "boolean"},
    },
    "required": ["item", "count", "note", "tags", "urgent"],
    "additionalProperties": False,
}
fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER, "strict": True}}
answers = [
    a.chat.completions.create(
        model=done.fine_tuned_model, messages=ask, max_tokens=120, temperature=1.0, seed=s, response_format=fmt
    )
    for s in range(50)
]
for r in answers:
    assert r.choices[0].finish_reason == "stop", r
    jsonschema.validate(json.loads(r.choices[0].message.content), ORDER)
distinct = len({r.choices[0].message.content for r in answers})
assert distinct > 1, "the answers were sampled"
print(f"structured output: 50 sampled answers valid against the schema, {distinct} distinct")


class Order(pydantic.BaseModel):
    item: typing.Literal["tea", "cake"]
    count: int = pydantic.Field(ge=1, le=9)


parsed = a.chat.completions.parse(model=done.fine_tuned_model, messages=ask, max_tokens=60, response_format=Order)
assert isinstance(parsed.choices[0].message.parsed, Order), parsed
obj = a.chat.completions.create(
    model=job.id, messages=ask, max_tokens=60, temperature=0.7, seed=1, response_format={"type": "json_object"}
)
assert isinstance(json.loads(obj.choices[0].message.content), dict), obj
expect_error(
    openai.BadRequestError,
    "response_format.json_schema.schema",
    lambda: a.chat.completions.create(
        model=MODEL, messages=ask, max_tokens=2,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
    ),
)
# log-probabilities as the SDK types them
lp = a.chat.completions.create(model=done.fine_tuned_model, messages=ask, max_tokens=6, logprobs=True, top_logprobs=3)
content = lp.choices[0].logprobs.content
assert len(content) == lp.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content), lp
assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.logprob for t in content), content
plain = a.completions.create(model=MODEL, prompt="say 1", max_tokens=4, temperature=0)
assert plain.object == "text_completion" and isinstance(plain.choices[0].text, str), plain
assert done.fine_tuned_model in [m.id for m in a.models.list()]
expect_error(
    openai.NotFoundError,
    "model",
    lambda: b.chat.completions.create(model=done.fine_tuned_model, messages=ask, max_tokens=2),
)
expect_error(
    openai.BadRequestError, "messages", lambda: a.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
)
expect_error(
    openai.BadRequestError,
    "temperature",
    lambda: a.chat.completions.create(model=MODEL, messages=ask, max_tokens=2, temperature=5),
)

# --- pause, resume: the curve goes on where it stopped --------------------------------------
long_job = a.fine_tuning.jobs.create(
    model=MODEL,
    training_file=f.id,
    metadata={"team": "b"},
    extra_body={
        "qtune": {
            "lora": LORA,
            "training": {"max_steps": 1000, "batch_size": 2, "max_seq_len": 96, "learning_rate": 0.01},
        }
    },
)
wait(long_job.id, {"running"}, until=lambda j: j.qtune["step"] >= 2)
# one worker is busy: the next job waits in the queue, and cancelling it ends it at once
queued = a.fine_tuning.jobs.create(model=MODEL, training_file=f.id, extra_body={"qtune": {"lora": LORA}})
assert queued.status == "queued", queued
cancelled = a.fine_tuning.jobs.cancel(queued.id)
assert cancelled.status == "cancelled", cancelled

paused = a.fine_tuning.jobs.pause(long_job.id)
assert paused.status in ("running", "paused"), paused
paused = wait(long_job.id, {"paused", "succeeded"})
assert paused.status == "paused", "the job finished before the pause landed"
stopped_at = paused.qtune["step"]
assert 0 < stopped_at < 1000, stopped_at
pause_checkpoints = [c.step_number for c in a.fine_tuning.jobs.checkpoints.list(long_job.id)]
assert pause_checkpoints == [stopped_at], pause_checkpoints
time.sleep(0.3)
assert a.fine_tuning.jobs.retrieve(long_job.id).status == "paused"
resumed = a.fine_tuning.jobs.resume(long_job.id)
assert resumed.status in ("queued", "running"), resumed
finished = wait(long_job.id, {"succeeded", "failed", "cancelled"}, within=300)
assert finished.status == "succeeded", finished
curve = list(csv.DictReader(io.StringIO(a.files.content(finished.result_files[0]).text)))
assert [int(r["step"]) for r in curve] == list(range(1, 1001)), [r["step"] for r in curve]
messages = [e.message for e in a.fine_tuning.jobs.list_events(long_job.id, limit=100)]
assert any(m.startswith("Job paused") for m in messages), messages
assert any("resumed" in m for m in messages), messages

# --- lists filtered by metadata --------------------------------------------------------------
team_a = [j.id for j in a.fine_tuning.jobs.list(metadata={"team": "a"})]
assert team_a == [job.id], team_a
team_b = [j.id for j in a.fine_tuning.jobs.list(metadata={"team": "b"}, limit=1)]
assert team_b == [long_job.id], team_b
everything = [j.id for j in a.fine_tuning.jobs.list(limit=2)]
assert everything == [queued.id, long_job.id, job.id], everything

# --- a fine-tuned model as the base of the next job ------------------------------------------
follow_up = a.fine_tuning.jobs.create(
    model=done.fine_tuned_model, training_file=f.id, extra_body={"qtune": {"training": {"max_steps": 2}}}
)
assert follow_up.model == MODEL, follow_up
assert wait(follow_up.id, {"succeeded", "failed"}).status == "succeeded"

# --- an Idempotency-Key makes a repeated create answer with the first job ---------------------
first = a.fine_tuning.jobs.create(
    model=MODEL, training_file=f.id, extra_headers={"Idempotency-Key": "sdk-flow-1"},
    extra_body={"qtune": {"lora": LORA, "training": {"max_steps": 1}}},
)
again = a.fine_tuning.jobs.create(
    model=MODEL, training_file=f.id, extra_headers={"Idempotency-Key": "sdk-flow-1"},
    extra_body={"qtune": {"lora": LORA, "training": {"max_steps": 1}}},
)
assert again.id == first.id, (first.id, again.id)
expect_error(
    openai.BadRequestError,
    "Idempotency-Key",
    lambda: a.fine_tuning.jobs.create(
        model=MODEL, training_file=f.id, extra_headers={"Idempotency-Key": "sdk-flow-1"}, seed=1
    ),
)

# --- errors, as the SDK's own exception classes carrying the field ---------------------------
expect_error(
    openai.BadRequestError, "model", lambda: a.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=f.id)
)
expect_error(
    openai.BadRequestError, "training_file", lambda: a.fine_tuning.jobs.create(model=MODEL, training_file="")
)
others = upload(b, train_path)
expect_error(
    openai.NotFoundError, "training_file", lambda: a.fine_tuning.jobs.create(model=MODEL, training_file=others.id)
)
# dpo trains on preference pairs: a file of chat records is refused for it (dpo_flow.py trains it)
expect_error(
    openai.BadRequestError,
    "training_file",
    lambda: a.fine_tuning.jobs.create(
        model=MODEL, training_file=f.id, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}
    ),
)
expect_error(
    openai.BadRequestError,
    "hyperparameters.n_epochs",
    lambda: a.fine_tuning.jobs.create(model=MODEL, training_file=f.id, hyperparameters={"n_epochs": 0}),
)
expect_error(
    openai.BadRequestError,
    "qtune.lora.r",
    lambda: a.fine_tuning.jobs.create(model=MODEL, training_file=f.id, extra_body={"qtune": {"lora": {"r": 0}}}),
)
# a file that is not training data: refused before any job exists, naming the line
bad_path = write("bad.jsonl", [json.dumps(RECORDS[0]), '{"messages": [{"role": "user"}]}'])
bad = upload(a, bad_path)
e = expect_error(
    openai.BadRequestError, "training_file", lambda: a.fine_tuning.jobs.create(model=MODEL, training_file=bad.id)
)
assert "line 2" in str(e), e
bad = a.files.retrieve(bad.id)
assert bad.status == "error" and "line 2" in bad.status_details, bad
expect_error(openai.NotFoundError, None, lambda: a.fine_tuning.jobs.retrieve(job.id + "x"))
assert b.fine_tuning.jobs.list().data == [], "another key sees no job of this one"
expect_error(openai.NotFoundError, None, lambda: b.fine_tuning.jobs.retrieve(job.id))
try:
    OpenAI(base_url=BASE_URL, api_key="not-a-key", max_retries=0).fine_tuning.jobs.list()
    raise AssertionError("a wrong key was let in")
except openai.AuthenticationError:
    pass

print("openai SDK", openai.__version__, "flow passed:", job.id, long_job.id, "paused at", stopped_at)
