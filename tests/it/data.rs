//! Datasets and bad input: formats, label masks, and a clear error for every malformed case.

use crate::helpers::*;
use candle_core::Device;
use qtune::spec::{DatasetFormat, JobSpec};
use qtune::train::tokenizer::TextTokenizer;
use qtune::train::{self, data, Silent};

fn tokenizer(dir: &std::path::Path) -> TextTokenizer {
    TextTokenizer::from_hf_dir(&tiny_model(dir)).unwrap()
}

fn labelled_text(tok: &TextTokenizer, ex: &data::Example) -> String {
    let ids: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.labels)
        .filter(|(_, &l)| l)
        .map(|(&i, _)| i)
        .collect();
    tok.inner.decode(&ids, false).unwrap()
}

#[test]
fn chat_labels_cover_answers_and_their_end_of_turn_token_only() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let path = write(
        dir.path(),
        "d.jsonl",
        &serde_json::json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you."},
        ]})
        .to_string(),
    );
    let (ex, report) = data::load_jsonl(
        &dataset_file(&path),
        DatasetFormat::Auto,
        &tok,
        512,
        false,
        data::DEFAULT_MAX_RECORD_BYTES,
    )
    .unwrap();
    assert_eq!(report.format, "messages");
    assert_eq!(
        labelled_text(&tok, &ex[0]),
        "Hello!<|im_end|>See you.<|im_end|>"
    );
    let full = tok.inner.decode(&ex[0].ids, false).unwrap();
    assert!(
        full.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"),
        "{full}"
    );
    // train_on_inputs puts loss on everything but the first token
    let (ex, _) = data::load_jsonl(
        &dataset_file(&path),
        DatasetFormat::Messages,
        &tok,
        512,
        true,
        data::DEFAULT_MAX_RECORD_BYTES,
    )
    .unwrap();
    assert_eq!(ex[0].label_count(), ex[0].ids.len() - 1);
}

#[test]
fn every_format_is_detected_and_ends_answers_with_eos() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let cases = [
        (
            serde_json::json!({"instruction": "Add", "input": "1 2", "output": "3"}),
            "alpaca",
            "3<|im_end|>",
        ),
        (
            serde_json::json!({"prompt": "Q: 2+2\nA:", "completion": " 4"}),
            "prompt_completion",
            " 4<|im_end|>",
        ),
        (
            serde_json::json!({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}),
            "sharegpt",
            "Yo<|im_end|>",
        ),
    ];
    for (record, format, labels) in cases {
        let path = write(dir.path(), "d.jsonl", &record.to_string());
        let (ex, report) = data::load_jsonl(
            &dataset_file(&path),
            DatasetFormat::Auto,
            &tok,
            512,
            false,
            data::DEFAULT_MAX_RECORD_BYTES,
        )
        .unwrap();
        assert_eq!(report.format, format);
        assert_eq!(labelled_text(&tok, &ex[0]), labels, "{format}");
    }
    let path = write(dir.path(), "d.jsonl", "{\"text\": \"abc\"}\n");
    let (ex, report) = data::load_jsonl(
        &dataset_file(&path),
        DatasetFormat::Auto,
        &tok,
        512,
        false,
        data::DEFAULT_MAX_RECORD_BYTES,
    )
    .unwrap();
    assert_eq!(report.format, "text");
    assert_eq!(labelled_text(&tok, &ex[0]), "bc<|im_end|>");
}

#[test]
fn truncation_is_counted_never_silent() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let lines = [
        serde_json::json!({"prompt": "p", "completion": "a long answer that gets cut"}),
        serde_json::json!({"prompt": "p", "completion": "ok"}),
        serde_json::json!({"prompt": "a prompt longer than the limit", "completion": "x"}),
    ];
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let path = write(dir.path(), "d.jsonl", &text.join("\n"));
    let (ex, report) = data::load_jsonl(
        &dataset_file(&path),
        DatasetFormat::Auto,
        &tok,
        8,
        false,
        data::DEFAULT_MAX_RECORD_BYTES,
    )
    .unwrap();
    assert_eq!(report.records, 3);
    assert_eq!(report.truncated, 2);
    assert_eq!(
        report.dropped_no_labels, 1,
        "the third line loses its whole answer"
    );
    assert_eq!(report.examples, 2);
    assert_eq!(ex.len(), 2);
    assert!(ex.iter().all(|e| e.ids.len() <= 8));
}

/// Runs a job on the tiny model and returns its error text.
fn job_error(dir: &std::path::Path, dataset: &str, extra: serde_json::Value) -> String {
    let model = tiny_model(dir);
    let data_path = write(dir, "bad.jsonl", dataset);
    let s = spec(&model, &data_path, extra);
    let opts = crate::helpers::run_options(&dir.join("out"));
    train::run(&s, &opts, &mut Silent).unwrap_err().to_string()
}

#[test]
fn bad_datasets_are_refused_with_the_line_and_the_reason() {
    let ok = "{\"text\": \"hello\"}";
    let cases: Vec<(String, serde_json::Value, &str)> = vec![
        (
            format!("{ok}\n{{not json\n"),
            serde_json::json!({}),
            "line 2: invalid JSON",
        ),
        (
            format!("{ok}\n[1, 2]\n"),
            serde_json::json!({}),
            "line 2: expected a JSON object",
        ),
        (
            "{\"instruction\": \"x\", \"output\": \"y\"}\n{\"instruction\": \"x\"}\n".into(),
            serde_json::json!({}),
            "line 2: missing field \"output\" (format alpaca)",
        ),
        (
            "{\"text\": 5}\n".into(),
            serde_json::json!({}),
            "line 1: field \"text\" must be a string, got a number",
        ),
        (
            "{\"foo\": 1}\n".into(),
            serde_json::json!({}),
            "line 1: cannot detect the dataset format",
        ),
        ("\n\n".into(), serde_json::json!({}), "is empty: no records"),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n".into(),
            serde_json::json!({}),
            "line 1: messages has no assistant turn",
        ),
        (
            "{\"messages\": [{\"role\": \"wizard\", \"content\": \"hi\"}]}\n".into(),
            serde_json::json!({}),
            "line 1: messages[0]: unknown role (expected system, developer, user, assistant or tool)",
        ),
        (
            "{\"messages\": [{\"role\": \"user\"}]}\n".into(),
            serde_json::json!({}),
            "line 1: messages[0]: missing string field \"content\"",
        ),
        (
            "{\"prompt\": \"a very long prompt indeed\", \"completion\": \"x\"}\n".into(),
            serde_json::json!({"training": {"max_seq_len": 4}}),
            "none of its 1 records has a label token left within max_seq_len=4",
        ),
        (
            format!("{ok}\n"),
            serde_json::json!({"dataset": {"format": "alpaca"}}),
            "line 1: missing field \"instruction\" (format alpaca)",
        ),
    ];
    for (i, (text, extra, expected)) in cases.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let msg = job_error(dir.path(), &text, extra);
        assert!(
            msg.contains(expected),
            "case {i}: expected {expected:?} in {msg:?}"
        );
        assert!(
            msg.contains("bad.jsonl") || expected.contains("max_seq_len"),
            "case {i}: the file is named: {msg}"
        );
    }
}

#[test]
fn bad_models_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data_path = write(dir.path(), "d.jsonl", "{\"text\": \"hello\"}");
    let run = |base: &str| {
        let s = JobSpec::from_json(&serde_json::json!({"base_model": base, "dataset": {"url": data_path.to_str().unwrap()}}).to_string()).unwrap();
        let opts = crate::helpers::run_options(&dir.path().join("out"));
        train::run(&s, &opts, &mut Silent).unwrap_err().to_string()
    };
    assert!(run("/nope/model.gguf").contains("GGUF file \"/nope/model.gguf\" does not exist"));
    assert!(run("not a model")
        .contains("neither a .gguf file, a local model folder, nor a Hub repo id"));

    // an unknown architecture in config.json
    let model = tiny_model(dir.path());
    let cfg = model.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(&cfg, text).unwrap();
    assert!(run(model.to_str().unwrap()).contains("unsupported architecture \"gpt_neox\""));

    // a missing weight names the tensor
    let model = tiny_model(&dir.path().join("second"));
    let mut w =
        candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    w.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&w, model.join("model.safetensors")).unwrap();
    assert!(run(model.to_str().unwrap())
        .contains("weight \"model.layers.1.mlp.up_proj.weight\" is missing"));

    // a Hub repo that is not cached, offline: names the repo and the cache path
    let hf_home = dir.path().join("hf");
    std::env::set_var("HF_HOME", &hf_home);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let msg = run("HuggingFaceTB/SmolLM2-135M-Instruct");
    assert!(
        msg.contains("HuggingFaceTB/SmolLM2-135M-Instruct")
            && msg.contains(hf_home.join("hub").to_str().unwrap()),
        "{msg}"
    );
}

#[test]
fn hub_cache_is_used_offline() {
    // A model laid out as hf-hub caches it (refs/main + snapshots/<sha>/...) loads with HF_HUB_OFFLINE=1.
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("hf/hub/models--acme--tiny");
    let snapshot = repo.join("snapshots/0123abc");
    qtune::cli::bench::random_model::write_model_dir(
        &snapshot,
        &qtune::cli::bench::random_model::tiny_config(),
        1,
    )
    .unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abc").unwrap();
    // run in a child process: HF_HOME is process-wide
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args([
            "generate",
            "--model",
            "acme/tiny",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "3",
        ])
        .env("HF_HOME", dir.path().join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// OpenAI's chat training records: an assistant turn with `weight: 0` stays as context without
/// loss, `developer` turns render as system turns, tool calls and tool answers go through the
/// template, and `tools` are rendered by a template that takes them and refused (naming the
/// line) by one that does not.
#[test]
fn openai_chat_records_honour_weights_tools_and_roles() {
    let dir = tempfile::tempdir().unwrap();
    let mut tok = tokenizer(dir.path());
    let record = serde_json::json!({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hmm.", "weight": 0},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny.", "weight": 1},
    ]});
    let path = write(dir.path(), "d.jsonl", &record.to_string());
    let load = |tok: &TextTokenizer, path: &std::path::Path| {
        data::load_jsonl(
            &dataset_file(path),
            DatasetFormat::Auto,
            tok,
            512,
            false,
            data::DEFAULT_MAX_RECORD_BYTES,
        )
    };
    let (ex, _) = load(&tok, &path).unwrap();
    let full = tok.inner.decode(&ex[0].ids, false).unwrap();
    assert!(full.starts_with("<|im_start|>system\nBe brief."), "{full}");
    assert!(
        full.contains("Hmm.") && full.contains("<|im_start|>tool\nsunny"),
        "{full}"
    );
    // the weight-0 answer carries no loss; the tool-calling turn and the last answer do
    assert_eq!(
        labelled_text(&tok, &ex[0]),
        "<|im_end|>Sunny.<|im_end|>",
        "{full}"
    );

    let mut with_tools = record.clone();
    with_tools["tools"] =
        serde_json::json!([{"type": "function", "function": {"name": "weather"}}]);
    let lines = format!("{record}\n{with_tools}");
    let path = write(dir.path(), "tools.jsonl", &lines);
    let err = load(&tok, &path).unwrap_err().to_string();
    assert!(err.contains("line 2") && err.contains("tools"), "{err}");
    // a template that renders tools (and tool calls) takes the same file
    tok.chat_template = Some(
        "{% if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{% endif %}\
         {% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\
         {% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}<|im_end|>\n{% endfor %}\
         {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
            .into(),
    );
    let (ex, _) = load(&tok, &path).unwrap();
    let full = tok.inner.decode(&ex[1].ids, false).unwrap();
    assert!(full.contains("\"name\":\"weather\""), "{full}");
    assert!(
        labelled_text(&tok, &ex[1]).contains("\"arguments\""),
        "the call is learned"
    );

    for (bad, says) in [
        (
            r#"{"messages": [{"role": "user", "content": "x", "weight": 0}, {"role": "assistant", "content": "y"}]}"#,
            "only assistant messages have a weight",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}"#,
            "must be 0 or 1",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]}"#,
            "weight 0",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": 3}"#,
            "tools",
        ),
    ] {
        let path = write(dir.path(), "bad.jsonl", bad);
        let err = load(&tok, &path).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains(says), "{bad}: {err}");
    }
}
