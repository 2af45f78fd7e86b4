//! The training engine on a tiny random model: correctness of every piece that training rests on.

use std::collections::HashMap;

use crate::helpers::*;
use candle_core::{DType, Device, Tensor, Var};
use qtune::cli::bench::random_model as synthetic;
use qtune::spec::LoraSpec;
use qtune::train::model::{self, ForwardMode, Llama};
use qtune::train::{self, checkpoint, data, Event, Reporter, Silent};

fn tiny_llama(lora: &LoraSpec, seed: u64) -> Llama {
    tiny_llama_in(lora, seed, DType::F32)
}

fn tiny_llama_in(lora: &LoraSpec, seed: u64, dtype: DType) -> Llama {
    let cfg = synthetic::tiny_config();
    let mut w = synthetic::random_weights(&cfg, 7).unwrap();
    Llama::load(cfg, &mut w, lora, None, seed, dtype, &Device::Cpu).unwrap()
}

fn lora(r: i64, targets: &[&str]) -> LoraSpec {
    LoraSpec::new(r, None, targets, false)
}

const ALL: [&str; 7] = qtune::spec::ALL_LINEAR;

fn batch_of(ids: &[&[u32]]) -> data::Batch {
    let examples: Vec<data::Example> = ids
        .iter()
        .map(|s| data::Example {
            ids: s.to_vec(),
            labels: vec![true; s.len()],
        })
        .collect();
    let refs: Vec<&data::Example> = examples.iter().collect();
    data::make_batch(&refs, 2, &Device::Cpu).unwrap()
}

fn fill_b(model: &Llama, seed: u64) {
    // B starts at zero; give it values so gradients w.r.t. A are not trivially zero.
    for (i, (name, var)) in model.lora_vars().into_iter().enumerate() {
        if name.ends_with("lora_B") {
            let (o, r) = var.dims2().unwrap();
            let vals: Vec<f32> = (0..o * r)
                .map(|k| {
                    (((k as u64 * 2654435761 + seed + i as u64) % 1000) as f32 / 1000.0 - 0.5) * 0.2
                })
                .collect();
            var.set(
                &Tensor::from_vec(vals, (o, r), &Device::Cpu)
                    .unwrap()
                    .to_dtype(var.dtype())
                    .unwrap(),
            )
            .unwrap();
        }
    }
}

#[test]
fn zero_b_leaves_the_base_model_unchanged() {
    let base = tiny_llama(&lora(4, &[]), 1);
    let adapted = tiny_llama(&lora(4, &ALL), 1);
    assert!(base.lora_vars().is_empty());
    assert_eq!(adapted.lora_vars().len(), 2 * 7 * 2);
    let ids = Tensor::new(&[[5u32, 17, 200, 3, 9, 44]], &Device::Cpu).unwrap();
    let d = max_abs_diff(&base.logits(&ids).unwrap(), &adapted.logits(&ids).unwrap());
    assert_eq!(d, 0.0, "B = 0 must give exactly the base logits");
    fill_b(&adapted, 1);
    assert!(max_abs_diff(&base.logits(&ids).unwrap(), &adapted.logits(&ids).unwrap()) > 1e-4);
}

#[test]
fn every_lora_tensor_gets_a_gradient_and_base_weights_never_change() {
    let model = tiny_llama(&lora(4, &ALL), 2);
    let frozen: Vec<Tensor> = std::iter::once(model.embed.clone())
        .chain(std::iter::once(model.norm.clone()))
        .chain(model.blocks.iter().flat_map(|b| {
            [b.attn_norm.clone(), b.mlp_norm.clone()]
                .into_iter()
                .chain(b.linears().map(|(_, l)| match &l.weight {
                    model::FrozenWeight::Dense(w) => w.clone(),
                    model::FrozenWeight::Quantized(_) => unreachable!("dense model"),
                }))
        }))
        .collect();
    let snapshot: Vec<Vec<f32>> = frozen
        .iter()
        .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let vars: Vec<Var> = model.lora_vars().into_iter().map(|(_, v)| v).collect();
    let spec = qtune::spec::TrainingSpec::default();
    let mut opt = train::Optimizer::new(&spec, vars.len());
    let batch = batch_of(&[&[1, 10, 20, 30, 40, 2], &[1, 50, 60, 2, 2, 2]]);
    for step in 0..5 {
        let mode = ForwardMode::train(step);
        let loss = model
            .loss_sum(&batch.ids, &batch.positions, &batch.targets, mode)
            .unwrap()
            .sum;
        let store = loss.backward().unwrap();
        // every LoRA factor gets a gradient (lora_grads errs naming one that does not)
        let g: Vec<Tensor> = model.lora_grads(&store).unwrap();
        assert_eq!(g.len(), vars.len());
        opt.step(&vars, &g, 1e-2).unwrap();
    }
    for (t, before) in frozen.iter().zip(&snapshot) {
        let after: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            after
                .iter()
                .zip(before)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "a base weight changed"
        );
    }
    let b_norm: f32 = model.lora_vars()[1]
        .1
        .as_tensor()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(b_norm > 0.0, "training must move B off zero");
}

/// Loss and every LoRA gradient of a training forward on `ids`, with oneDNN and the fused kernels
/// switched as asked (both are thread-local switches).
fn loss_and_lora_grads(model: &Llama, ids: &[&[u32]], optimised: bool) -> (f32, Vec<Vec<f32>>) {
    qtune::train::use_onednn(optimised);
    train::use_fused_paths(optimised);
    let mode = ForwardMode::train(0);
    let out = loss_and_grads(model, &batch_of(ids), mode);
    qtune::train::use_onednn(true);
    train::use_fused_paths(true);
    out
}

/// Loss and every LoRA gradient (flattened, in `lora_vars` order) of one forward + backward.
fn loss_and_grads(model: &Llama, batch: &data::Batch, mode: ForwardMode) -> (f32, Vec<Vec<f32>>) {
    let loss = model
        .loss_sum(&batch.ids, &batch.positions, &batch.targets, mode)
        .unwrap()
        .sum;
    let store = loss.backward().unwrap();
    let g = model
        .lora_grads(&store)
        .unwrap()
        .iter()
        .map(|g| g.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    (loss.to_scalar::<f32>().unwrap(), g)
}

/// `‖a − b‖ / ‖b‖`.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f32>()
        .sqrt();
    diff / b.iter().map(|y| y * y).sum::<f32>().sqrt()
}

/// Same loss and same LoRA gradients, both to relative error `tol`.
fn assert_close(
    what: &str,
    (la, ga): &(f32, Vec<Vec<f32>>),
    (lb, gb): &(f32, Vec<Vec<f32>>),
    tol: f32,
) {
    assert!(((la - lb) / lb).abs() < tol, "{what}: loss {la} vs {lb}");
    for (a, b) in ga.iter().zip(gb) {
        assert!(
            b.iter().any(|&y| y != 0.0),
            "{what}: a LoRA gradient is zero"
        );
        let err = relative_error(a, b);
        assert!(err < tol, "{what}: relative gradient error {err}");
    }
}

/// The optimised path (oneDNN matmuls, fused attention, fused elementwise kernels) against the
/// plain composite path (candle's gemm and stock ops) on the tiny model: same loss, same LoRA
/// gradients. Sequences of 150 tokens cross several attention blocks; one is mostly padding.
#[test]
fn optimised_path_matches_the_plain_composite_path() {
    assert!(
        qtune::train::onednn_available(),
        "oneDNN (libdnnl.so.2) is not installed: apt-get install libdnnl2 (scripts/test.sh does)"
    );
    let long: Vec<u32> = (0..150).map(|i| (i * 37 % 250 + 3) as u32).collect();
    let short: Vec<u32> = (0..40).map(|i| (i * 11 % 250 + 3) as u32).collect();
    let ids: [&[u32]; 2] = [&long, &short];
    let model = tiny_llama(&lora(4, &ALL), 5);
    fill_b(&model, 9);
    assert_close(
        "llama",
        &loss_and_lora_grads(&model, &ids, true),
        &loss_and_lora_grads(&model, &ids, false),
        1e-4,
    );
    // Mistral's sliding window, a single key/value head, Qwen2's q/k/v biases, LoRA dropout.
    let mut cfg = synthetic::tiny_config();
    cfg.sliding_window = Some(48);
    cfg.num_key_value_heads = 1;
    cfg.attention_bias = true;
    let mut w = synthetic::random_weights(&cfg, 8).unwrap();
    let with_dropout = LoraSpec {
        dropout: 0.1,
        ..lora(4, &ALL)
    };
    let model = Llama::load(
        cfg,
        &mut w,
        &with_dropout,
        None,
        6,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    fill_b(&model, 10);
    assert_close(
        "sliding window, biases, dropout",
        &loss_and_lora_grads(&model, &ids, true),
        &loss_and_lora_grads(&model, &ids, false),
        1e-4,
    );
}

/// Gradient checkpointing recomputes each layer in backward: same loss, same LoRA gradients
/// (dropout on, so the recomputed masks must be the same masks), and the same training curve.
#[test]
fn gradient_checkpointing_gives_the_same_gradients_and_curve() {
    let mut spec = lora(4, &ALL);
    spec.dropout = 0.1;
    let mut model = tiny_llama(&spec, 5);
    fill_b(&model, 3);
    let batch = batch_of(&[&[1, 10, 20, 30, 40, 2], &[1, 50, 60, 70, 2, 2]]);
    let mode = ForwardMode::train(11);
    // Both implementations: the fused CPU layer (which runs its forward again in backward) and
    // the composite one (a custom backward that rebuilds the layer's graph).
    for fused in [true, false] {
        train::use_fused_paths(fused);
        model.gradient_checkpointing = false;
        let plain = loss_and_grads(&model, &batch, mode);
        model.gradient_checkpointing = true;
        let ckpt = loss_and_grads(&model, &batch, mode);
        train::use_fused_paths(true);
        assert_close(&format!("fused {fused}"), &ckpt, &plain, 1e-5);
    }

    // through the job spec: the curve of a checkpointed run is the plain run's
    let dir = tempfile::tempdir().unwrap();
    let data = memorisable_chat(dir.path(), 8);
    let tiny = tiny_model(dir.path());
    let curve = |checkpointing: bool, out: &str| {
        let s = crate::helpers::spec(
            &tiny,
            &data,
            serde_json::json!({"training": {"max_steps": 6, "gradient_checkpointing": checkpointing},
                               "lora": {"dropout": 0.1}}),
        );
        let out = dir.path().join(out);
        train::run(&s, &run_options(&out), &mut Silent).unwrap();
        train_losses(&out)
    };
    let (plain, ckpt) = (curve(false, "plain"), curve(true, "ckpt"));
    assert_eq!(plain.len(), 6);
    for ((s1, l1), (s2, l2)) in plain.iter().zip(&ckpt) {
        assert_eq!(s1, s2);
        assert!(
            (l1 - l2).abs() < 1e-5 * l1.abs().max(1.0),
            "step {s1}: {l1} vs {l2}"
        );
    }
}

/// A bf16 base on the CPU: linear weights stored in bf16, everything else f32; the loss and the
/// LoRA gradients stay within bfloat16's precision of the f32 run, oneDNN's bf16 kernels agree
/// with the fallback on the same rounded numbers, and a job's curve follows the f32 curve.
#[test]
fn bf16_base_on_the_cpu_tracks_the_f32_run() {
    let spec = lora(4, &ALL);
    let model32 = tiny_llama_in(&spec, 5, DType::F32);
    let model16 = tiny_llama_in(&spec, 5, DType::BF16);
    assert_eq!(model16.embed.dtype(), DType::F32);
    match &model16.blocks[0].q_proj.weight {
        model::FrozenWeight::Dense(w) => assert_eq!(w.dtype(), DType::BF16),
        model::FrozenWeight::Quantized(_) => unreachable!("dense"),
    }
    fill_b(&model32, 3);
    fill_b(&model16, 3);
    let batch = batch_of(&[&[1, 10, 20, 30, 40, 2], &[1, 50, 60, 70, 2, 2]]);
    let mode = ForwardMode::train(0);
    // All LoRA gradients as one vector: their relative error as a whole.
    let grads_of = |m: &Llama, onednn: bool| {
        qtune::train::use_onednn(onednn);
        let (loss, g) = loss_and_grads(m, &batch, mode);
        qtune::train::use_onednn(true);
        (loss, g.concat())
    };
    let rel = relative_error;
    let (l32, g32) = grads_of(&model32, true);
    let (l16, g16) = grads_of(&model16, true);
    let (l16_fallback, g16_fallback) = grads_of(&model16, false);
    assert!(((l16 - l32) / l32).abs() < 2e-2, "{l16} vs {l32}");
    assert!(
        rel(&g16, &g32) < 5e-2,
        "bf16 vs f32 gradients: {}",
        rel(&g16, &g32)
    );
    assert!(((l16 - l16_fallback) / l16).abs() < 1e-4);
    assert!(
        rel(&g16, &g16_fallback) < 1e-3,
        "{}",
        rel(&g16, &g16_fallback)
    );

    let dir = tempfile::tempdir().unwrap();
    let data = memorisable_chat(dir.path(), 8);
    let tiny = tiny_model(dir.path());
    let curve = |dtype: &str, out: &str| {
        let s = crate::helpers::spec(
            &tiny,
            &data,
            serde_json::json!({"training": {"max_steps": 8}, "compute_dtype": dtype}),
        );
        let out = dir.path().join(out);
        train::run(&s, &run_options(&out), &mut Silent).unwrap();
        train_losses(&out)
    };
    let (f32_curve, bf16_curve) = (curve("f32", "f32"), curve("bf16", "bf16"));
    assert_eq!(f32_curve.len(), 8);
    for ((s1, a), (_, b)) in f32_curve.iter().zip(&bf16_curve) {
        assert!(
            (a - b).abs() < 2e-2 * a.abs(),
            "step {s1}: f32 {a} vs bf16 {b}"
        );
    }
    assert!(
        bf16_curve.last().unwrap().1 < bf16_curve[0].1,
        "the bf16 run learns"
    );
}

#[test]
fn loss_falls_and_the_adapter_is_peft_shaped() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path());
    let data_path = memorisable_chat(dir.path(), 8);
    let spec = spec(
        &model_dir,
        &data_path,
        serde_json::json!({
            "lora": {"target_modules": "all-linear", "r": 8},
            "training": {"epochs": 12, "batch_size": 4},
        }),
    );
    let out = dir.path().join("out");
    let outcome = train::run(&spec, &run_options(&out), &mut Silent).unwrap();
    assert_eq!(outcome.steps, 24);
    let losses = train_losses(&out);
    assert_eq!(losses.len(), 24);
    let first = losses[0].1;
    let last = losses.iter().rev().take(4).map(|l| l.1).sum::<f64>() / 4.0;
    assert!(
        last < 0.5 * first,
        "loss should fall: first {first:.3}, last {last:.3}"
    );

    let tensors = candle_core::safetensors::load(
        outcome.adapter_dir.join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(tensors.len(), 2 * 7 * 2);
    let a = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let b = &tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    assert_eq!(a.dims(), &[8, 32]);
    assert_eq!(b.dims(), &[32, 8]);
    assert_eq!(a.dtype(), DType::F32);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(outcome.adapter_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 16.0);
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    assert_eq!(cfg["bias"], "none");
}

#[test]
fn exported_adapter_reproduces_the_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path());
    let data_path = memorisable_chat(dir.path(), 8);
    let spec = spec(
        &model_dir,
        &data_path,
        serde_json::json!({"training": {"max_steps": 5}}),
    );
    let out = dir.path().join("out");
    train::run(&spec, &run_options(&out), &mut Silent).unwrap();
    let fresh = model::load_base(
        model_dir.to_str().unwrap(),
        None,
        &spec.lora,
        None,
        999,
        &Device::Cpu,
    )
    .unwrap();
    let untouched = model::load_base(
        model_dir.to_str().unwrap(),
        None,
        &spec.lora,
        None,
        999,
        &Device::Cpu,
    )
    .unwrap();
    checkpoint::load_adapter(&out.join("adapter"), &fresh.model).unwrap();
    // the final checkpoint's adapter must be the same weights
    let from_ckpt = model::load_base(
        model_dir.to_str().unwrap(),
        None,
        &spec.lora,
        None,
        5,
        &Device::Cpu,
    )
    .unwrap();
    checkpoint::load_adapter(&out.join("checkpoint-5"), &from_ckpt.model).unwrap();
    let ids = Tensor::new(&[[1u32, 40, 41, 42, 43, 2]], &Device::Cpu).unwrap();
    let l1 = fresh.model.logits(&ids).unwrap();
    assert_eq!(
        max_abs_diff(&l1, &from_ckpt.model.logits(&ids).unwrap()),
        0.0
    );
    assert!(
        max_abs_diff(&l1, &untouched.model.logits(&ids).unwrap()) > 1e-5,
        "the adapter must change the logits"
    );

    // and a model trained in memory, saved and reloaded into a fresh base, computes exactly the
    // same logits
    let trained = tiny_llama(&lora(4, &ALL), 11);
    let vars: Vec<Var> = trained.lora_vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = train::Optimizer::new(&qtune::spec::TrainingSpec::default(), vars.len());
    let batch = batch_of(&[&[1, 10, 20, 30, 40, 2]]);
    for step in 0..3 {
        let mode = ForwardMode::train(step);
        let store = trained
            .loss_sum(&batch.ids, &batch.positions, &batch.targets, mode)
            .unwrap()
            .sum
            .backward()
            .unwrap();
        let grads: Vec<Tensor> = trained.lora_grads(&store).unwrap();
        opt.step(&vars, &grads, 1e-2).unwrap();
    }
    let spec = crate::helpers::spec(
        &model_dir,
        &data_path,
        serde_json::json!({"lora": {"r": 4, "target_modules": "all-linear"}}),
    );
    let saved = dir.path().join("saved");
    checkpoint::save_adapter(&saved, &trained, &spec, "tiny").unwrap();
    let reloaded = tiny_llama(&lora(4, &ALL), 99);
    checkpoint::load_adapter(&saved, &reloaded).unwrap();
    assert_eq!(
        max_abs_diff(
            &trained.logits(&ids).unwrap(),
            &reloaded.logits(&ids).unwrap()
        ),
        0.0
    );
}

#[test]
fn batch_times_accumulation_gives_the_same_first_update() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path());
    let data_path = memorisable_chat(dir.path(), 8);
    let run_with = |bs: i64, acc: i64, name: &str| -> HashMap<String, Tensor> {
        let s = spec(
            &model_dir,
            &data_path,
            serde_json::json!({
                "training": {"batch_size": bs, "gradient_accumulation_steps": acc, "max_steps": 1, "optimizer": "sgd", "learning_rate": 0.5}
            }),
        );
        let out = dir.path().join(name);
        train::run(&s, &run_options(&out), &mut Silent).unwrap();
        candle_core::safetensors::load(out.join("adapter/adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
    };
    let a = run_with(4, 1, "b4a1");
    let b = run_with(1, 4, "b1a4");
    let c = run_with(2, 2, "b2a2");
    let mut moved = 0f32;
    for (k, t) in &a {
        let d1 = max_abs_diff(t, &b[k]);
        let d2 = max_abs_diff(t, &c[k]);
        assert!(d1 < 1e-5 && d2 < 1e-5, "{k}: {d1} {d2}");
        if k.contains("lora_B") {
            moved += t
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
        }
    }
    assert!(moved > 0.0, "the update must move B");
}

#[test]
fn resume_continues_the_identical_curve() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path());
    let data_path = memorisable_chat(dir.path(), 10);
    let s = spec(
        &model_dir,
        &data_path,
        serde_json::json!({
            "lora": {"dropout": 0.1},
            "training": {"epochs": 3, "batch_size": 2, "lr_scheduler": "cosine", "warmup_steps": 2},
        }),
    );
    let straight = dir.path().join("straight");
    train::run(&s, &run_options(&straight), &mut Silent).unwrap();
    let full = train_losses(&straight);
    assert_eq!(full.len(), 15);

    // same seed, same data: the same curve, bit for bit
    let again = dir.path().join("again");
    train::run(&s, &run_options(&again), &mut Silent).unwrap();
    assert_eq!(train_losses(&again), full);

    let interrupted = dir.path().join("interrupted");
    let err = train::run(
        &s,
        &run_options(&interrupted),
        &mut crate::helpers::StopAfter { n: 7, seen: 0 },
    )
    .unwrap_err();
    assert!(matches!(err, train::Error::Cancelled));
    assert!(interrupted
        .join("checkpoint-7/optimizer.safetensors")
        .exists());
    let mut resume = run_options(&interrupted);
    resume.resume = true;
    train::run(&s, &resume, &mut Silent).unwrap();
    let resumed = train_losses(&interrupted);
    assert_eq!(
        resumed.iter().map(|l| l.0).collect::<Vec<_>>(),
        (1..=15).collect::<Vec<u64>>()
    );
    for ((step, a), (_, b)) in full.iter().zip(&resumed) {
        assert_eq!(a.to_bits(), b.to_bits(), "step {step}: {a} vs {b}");
    }
}

#[test]
fn validation_split_is_evaluated() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path());
    let data_path = memorisable_chat(dir.path(), 12);
    let s = spec(
        &model_dir,
        &data_path,
        serde_json::json!({
            "dataset": {"validation_split": 0.25},
            "training": {"epochs": 2, "eval_every_steps": 2},
        }),
    );
    let out = dir.path().join("out");
    let mut events = Vec::new();
    struct Collect<'a>(&'a mut Vec<Event>);
    impl Reporter for Collect<'_> {
        fn report(&mut self, e: &Event) {
            self.0.push(e.clone());
        }
    }
    let outcome = train::run(&s, &run_options(&out), &mut Collect(&mut events)).unwrap();
    let evals: Vec<u64> = events
        .iter()
        .filter_map(|e| {
            if let Event::Eval(ev) = e {
                Some(ev.step)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(evals, vec![2, 4, 6, 8, 10]);
    assert!(outcome.eval_loss.unwrap().is_finite());
    let Some(Event::Data(train::DataSummary {
        train, validation, ..
    })) = events.iter().find(|e| matches!(e, Event::Data(_)))
    else {
        panic!("no data event")
    };
    assert_eq!(train.records, 12);
    assert_eq!(train.examples, 9);
    assert_eq!(validation.as_ref().unwrap().examples, 3);
}

/// Decoding through the key/value cache picks the same tokens as recomputing the whole sequence
/// for every token (greedy, with a trained adapter applied, on a sliding-window config too);
/// sampling with a seed repeats itself, stop sequences cut the text, and the streamed pieces
/// are the text.
#[test]
fn cached_decoding_matches_the_uncached_path_and_sampling_is_seeded() {
    use qtune::train::generate::{self, Sampling};
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path());
    let data_path = memorisable_chat(dir.path(), 8);
    let spec = spec(
        &model_dir,
        &data_path,
        serde_json::json!({"training": {"max_steps": 30, "learning_rate": 0.01}}),
    );
    let out = dir.path().join("out");
    train::run(&spec, &run_options(&out), &mut Silent).unwrap();
    let mut base = model::load_base(
        model_dir.to_str().unwrap(),
        None,
        &spec.lora,
        None,
        0,
        &Device::Cpu,
    )
    .unwrap();
    checkpoint::load_adapter(&out.join("adapter"), &base.model).unwrap();
    let prompt = base
        .tokenizer
        .render_chat(
            &[qtune::train::tokenizer::Message::new("user", "say 2")],
            true,
        )
        .unwrap();
    let ids = base.tokenizer.encode(&prompt).unwrap();
    let uncached = generate::greedy_uncached(&base, &ids, 24).unwrap();
    let cached = generate::greedy(&base, &ids, 24).unwrap();
    assert!(!cached.is_empty());
    assert_eq!(cached, uncached);
    // the adapter is applied on the cached path: the untrained base says something else
    let untrained = model::load_base(
        model_dir.to_str().unwrap(),
        None,
        &spec.lora,
        None,
        0,
        &Device::Cpu,
    )
    .unwrap();
    assert_ne!(generate::greedy(&untrained, &ids, 24).unwrap(), cached);
    // a window shorter than the sequence: the cached mask must drop the same keys
    base.model.cfg.sliding_window = Some(5);
    assert_eq!(
        generate::greedy(&base, &ids, 12).unwrap(),
        generate::greedy_uncached(&base, &ids, 12).unwrap()
    );
    base.model.cfg.sliding_window = None;

    let sampled = |seed: u64| {
        let s = Sampling {
            max_tokens: 20,
            temperature: 1.5,
            top_p: 0.95,
            top_k: 50,
            seed,
            ..Sampling::default()
        };
        let mut pieces = String::new();
        let g = generate::generate(&base.model, &base.tokenizer, &ids, &s, &mut |t, _| {
            pieces.push_str(t);
            true
        })
        .unwrap();
        assert_eq!(pieces, g.text, "the streamed pieces are the text");
        g.tokens
    };
    assert_eq!(sampled(7), sampled(7), "a seed repeats its sample");
    let draws: std::collections::HashSet<Vec<u32>> = (0..6).map(sampled).collect();
    assert!(draws.len() > 1, "different seeds draw differently");
    // a stop sequence ends the answer before its first appearance
    let greedy_text = base.tokenizer.decode(&cached).unwrap();
    let stop: String = greedy_text.chars().skip(3).take(2).collect();
    let s = Sampling {
        max_tokens: 24,
        stop: vec![stop.clone()],
        ..Sampling::default()
    };
    let g = generate::generate(&base.model, &base.tokenizer, &ids, &s, &mut |_, _| true).unwrap();
    let before = &greedy_text[..greedy_text.find(&stop).unwrap()];
    assert_eq!(
        (g.text.as_str(), g.finish),
        (before, generate::Finish::Stop)
    );
}
