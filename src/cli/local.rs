//! The commands that run the engine in this process, without a server: `train`, `export`,
//! `generate` and `eval`.

use std::path::{Path, PathBuf};

use super::{EvalFormat, ExportFormat};
use crate::spec::{JobSpec, LoraSpec};
use crate::train::{self, Event, Reporter};

/// `qtune train`: one job, its events printed as progress lines, its outcome as JSON.
pub(super) fn train(
    spec: &Path,
    output: PathBuf,
    resume: bool,
    init_adapter: Option<PathBuf>,
    device: &str,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(spec).map_err(|e| anyhow::anyhow!("{}: {e}", spec.display()))?;
    let spec = JobSpec::from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", spec.display()))?;
    let opts = train::RunOptions {
        output_dir: output,
        device: train::device::parse(device)?,
        resume,
        init_adapter,
        datasets: None,
        max_record_bytes: train::data::DEFAULT_MAX_RECORD_BYTES,
        max_total_steps: None,
    };
    let outcome = train::run(&spec, &opts, &mut PrintReporter)?;
    // the process's peak resident memory: what `POST /v1/jobs/estimate` predicts on the CPU
    let mut summary = serde_json::to_value(&outcome)?;
    summary["peak_rss_bytes"] = train::device::peak_rss_bytes().into();
    // where the run's time went, by the kernels' own timers (steps and evaluations; one
    // job in this process, so nothing else adds to them)
    summary["seconds_by_part"] = train::timing::seconds_by_part(&train::timing::take()).into();
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// `qtune export`: an adapter over its base as a merged folder, a GGUF model or a GGUF LoRA.
pub(super) fn export(
    model: &Path,
    adapter: &Path,
    format: ExportFormat,
    gguf_type: &str,
    output: &Path,
) -> anyhow::Result<()> {
    match format {
        ExportFormat::GgufLora => {
            let cfg = train::model::base_config(model)?;
            let n = train::export::gguf_lora(adapter, &cfg, output)?;
            eprintln!("wrote {n} LoRA tensors to {}", output.display());
            println!("{}", serde_json::json!({"tensors": n, "file": output}));
        }
        ExportFormat::Gguf => {
            let ty = train::export::GgufType::parse(gguf_type).expect("clap checked the name");
            let report = train::export::gguf_model(model, adapter, ty, output)?;
            eprintln!(
                "merged the adapter into {} weights and wrote {} ({})",
                report.merged,
                output.display(),
                report.files.join(", ")
            );
            println!("{}", serde_json::to_string(&report)?);
        }
        ExportFormat::Merged => {
            let report = train::export::merged(model, adapter, output)?;
            eprintln!(
                "merged the adapter into {} weights ({} tensors copied) in {}",
                report.merged,
                report.copied,
                output.display()
            );
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}

/// The base `model` with the adapter in `adapter` (its own r, alpha and targets, read before
/// loading), loaded by `load`.
fn with_adapter(
    adapter: Option<&Path>,
    load: impl FnOnce(&LoraSpec) -> train::Result<train::model::BaseModel>,
) -> anyhow::Result<train::model::BaseModel> {
    let lora = match adapter {
        None => LoraSpec::default(),
        Some(dir) => train::checkpoint::read_lora_spec(dir)?,
    };
    let base = load(&lora)?;
    if let Some(dir) = adapter {
        train::checkpoint::load_adapter(dir, &base.model)?;
    }
    Ok(base)
}

/// `qtune generate`: one answer to `prompt`, printed as it is decoded.
pub(super) fn generate(
    model: &str,
    adapter: Option<&Path>,
    prompt: &str,
    sampling: &train::generate::Sampling,
    no_chat_template: bool,
) -> anyhow::Result<()> {
    sampling
        .check()
        .map_err(|(field, why)| anyhow::anyhow!("--{}: {why}", field.replace('_', "-")))?;
    let base = with_adapter(adapter, |lora| train::model::load_for_decoding(model, lora))?;
    let ids = if no_chat_template {
        base.tokenizer.encode_prompt(prompt)?
    } else {
        let rendered = base
            .tokenizer
            .render_chat(&[train::tokenizer::Message::new("user", prompt)], true)?;
        base.tokenizer.encode(&rendered)?
    };
    // the answer is printed as it is decoded
    let mut stdout = std::io::stdout();
    train::generate::generate(
        &base.model,
        &base.tokenizer,
        &ids,
        sampling,
        &mut |text, _| {
            use std::io::Write;
            stdout.write_all(text.as_bytes()).is_ok() && stdout.flush().is_ok()
        },
    )?;
    println!();
    Ok(())
}

/// `qtune eval`: the loss and token accuracy of a model (and adapter) on a dataset file.
pub(super) fn eval(
    model: &str,
    adapter: Option<&Path>,
    data: &Path,
    format: EvalFormat,
    max_seq_len: usize,
    batch_size: usize,
    json: bool,
) -> anyhow::Result<()> {
    let cpu = candle_core::Device::Cpu;
    let base = with_adapter(adapter, |lora| {
        train::model::load_base(model, None, lora, None, 0, &cpu)
    })?;
    let file = train::DatasetFile {
        path: data.to_path_buf(),
        name: data.display().to_string(),
    };
    let (examples, _) = train::data::load_jsonl(
        &file,
        format.into(),
        &base.tokenizer,
        max_seq_len,
        false,
        train::data::DEFAULT_MAX_RECORD_BYTES,
    )?;
    let measured = train::evaluate(&base, &examples, batch_size)?;
    let tokens: usize = examples.iter().map(|e| e.label_count()).sum();
    if json {
        let summary = serde_json::json!({
            "loss": measured.loss,
            "accuracy": measured.accuracy,
            "examples": examples.len(),
            "label_tokens": tokens,
        });
        println!("{summary}");
    } else {
        println!(
            "loss {:.4}  accuracy {:.4}  ({} examples, {tokens} label tokens)",
            measured.loss,
            measured.accuracy,
            examples.len()
        );
    }
    Ok(())
}

/// Prints engine events as progress lines.
struct PrintReporter;

impl Reporter for PrintReporter {
    fn report(&mut self, event: &Event) {
        match event {
            Event::Phase(phase) => eprintln!("phase: {}", serde_json::to_string(phase).unwrap_or_default().trim_matches('"')),
            Event::Data(train::DataSummary {
                train,
                validation,
                total_steps,
                trainable_parameters,
            }) => {
                eprintln!(
                    "train data: {} ({}): {} records, {} examples kept, {} truncated to max_seq_len, {} dropped (no label left), {} tokens, {} label tokens",
                    train.path, train.format, train.records, train.examples, train.truncated, train.dropped_no_labels, train.tokens, train.label_tokens
                );
                if let Some(v) = validation {
                    eprintln!(
                        "validation: {}: {} examples, {} label tokens",
                        v.path, v.examples, v.label_tokens
                    );
                }
                eprintln!("{total_steps} optimizer steps, {trainable_parameters} trainable parameters");
            }
            Event::Step(m) => eprintln!(
                "step {}/{}  epoch {:.2}  loss {:.4}  acc {:.3}  lr {:.3e}  grad_norm {:.3}  {:.0} tok/s  {:.2}s",
                m.step, m.total_steps, m.epoch, m.train_loss, m.train_accuracy.unwrap_or(f64::NAN), m.learning_rate, m.grad_norm, m.tokens_per_second, m.elapsed_seconds
            ),
            Event::Eval(e) => eprintln!(
                "eval at step {}: eval_loss {:.4}  eval_accuracy {:.3}",
                e.step,
                e.eval_loss,
                e.eval_accuracy.unwrap_or(f64::NAN)
            ),
            Event::Checkpoint { step, path } => eprintln!("checkpoint {step}: {}", path.display()),
            Event::Best { step } => eprintln!("best evaluation so far: step {step}"),
        }
    }
}
