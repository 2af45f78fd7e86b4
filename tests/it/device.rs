//! The engine on the device `QTUNE_TEST_DEVICE` names (`cpu` when unset; `cuda:0` on a GPU
//! machine, in a build with `--features cuda`: scripts/gpu-check.sh runs these there). What runs
//! is the path a GPU takes: candle's composite graph (on the CPU the fused layer is switched off
//! for these tests), quantized weights unpacked by candle's tensor ops, bf16 on the device.

use candle_core::{DType, Device, Tensor};
use qtune::cli::bench::random_model as synthetic;
use qtune::train::model::{ForwardMode, Llama};
use qtune::train::model::{Kind4, QuantizedWeight};
use qtune::train::{self, data, Silent};

use crate::helpers::*;

fn device() -> Device {
    let name = std::env::var("QTUNE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    train::device::parse(&name).unwrap_or_else(|e| panic!("QTUNE_TEST_DEVICE={name}: {e}"))
}

/// While it lives, this thread runs the composite graph (what other devices run) on the CPU.
struct CompositePath;

impl CompositePath {
    fn on() -> CompositePath {
        train::use_fused_paths(false);
        CompositePath
    }
}

impl Drop for CompositePath {
    fn drop(&mut self) {
        train::use_fused_paths(true);
    }
}

fn options(out: &std::path::Path) -> train::RunOptions {
    train::RunOptions {
        device: device(),
        ..run_options(out)
    }
}

#[test]
fn lora_gradients_on_the_device_match_finite_differences() {
    // (the engine's own finite-difference check: on the CPU, float64 runs the composite graph)
    let device = device();
    let _composite = CompositePath::on();
    let cfg = synthetic::tiny_config();
    let mut weights = synthetic::random_weights(&cfg, 7).unwrap();
    let lora = qtune::spec::LoraSpec::new(2, Some(4.0), &["q_proj", "v_proj", "down_proj"], false);
    // float64 on the device, so that central differences are exact to ~1e-9
    let model = Llama::load(cfg, &mut weights, &lora, None, 3, DType::F64, &device).unwrap();
    for (i, (name, var)) in model.lora_vars().into_iter().enumerate() {
        if name.ends_with("lora_B") {
            let (o, r) = var.dims2().unwrap();
            let vals: Vec<f64> = (0..o * r)
                .map(|k| ((k * 37 + i * 11) % 100) as f64 / 500.0 - 0.1)
                .collect();
            var.set(&Tensor::from_vec(vals, (o, r), &device).unwrap())
                .unwrap();
        }
    }
    let examples: Vec<data::Example> = [&[1u32, 10, 20, 30, 40, 2][..], &[1, 50, 60, 70, 2]]
        .iter()
        .map(|s| data::Example {
            ids: s.to_vec(),
            labels: vec![true; s.len()],
        })
        .collect();
    let refs: Vec<&data::Example> = examples.iter().collect();
    let batch = data::make_batch(&refs, 2, &device).unwrap();
    let loss_of = |mode| model.batch_loss(&batch, mode).unwrap().sum;
    let loss = loss_of(ForwardMode::train(0));
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for (name, var) in model.lora_vars() {
        let g: Vec<f64> = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in idx.iter().take(3) {
            let orig: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let at = |delta: f64| {
                let mut v = orig.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &device).unwrap())
                    .unwrap();
                loss_of(ForwardMode::EVAL).to_scalar::<f64>().unwrap()
            };
            let eps = 1e-4;
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(orig, var.shape(), &device).unwrap())
                .unwrap();
            assert!(
                (numeric - g[i]).abs() < 1e-5 * g[i].abs() + 1e-8,
                "{name}[{i}] on {device:?}: analytic {} vs numeric {numeric}",
                g[i]
            );
            checked += 1;
        }
    }
    // three targets, two layers, A and B, three entries each
    assert_eq!(checked, 3 * 2 * 2 * 3);
}

type Quantize = fn(&Tensor) -> QuantizedWeight;

#[test]
fn quantized_weights_unpack_on_the_device_as_the_cpu_kernels_do() {
    let device = device();
    // an (out, in) weight whose size is not a whole number of blocks
    let (o, i) = (37, 53);
    let values: Vec<f32> = (0..o * i)
        .map(|k| ((k * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.3)
        .collect();
    let on_cpu = Tensor::from_vec(values.clone(), (o, i), &Device::Cpu).unwrap();
    let on_device = on_cpu.to_device(&device).unwrap();
    let cases: [(&str, Quantize); 5] = [
        ("nf4", |w| {
            QuantizedWeight::four_bit(w, Kind4::Nf4, false).unwrap()
        }),
        ("nf4 double", |w| {
            QuantizedWeight::four_bit(w, Kind4::Nf4, true).unwrap()
        }),
        ("fp4", |w| {
            QuantizedWeight::four_bit(w, Kind4::Fp4, false).unwrap()
        }),
        ("fp4 double", |w| {
            QuantizedWeight::four_bit(w, Kind4::Fp4, true).unwrap()
        }),
        ("int8", |w| QuantizedWeight::int8(w).unwrap()),
    ];
    for (name, quantize) in cases {
        let kernels = quantize(&on_cpu)
            .dequantize(&Device::Cpu, DType::F32)
            .unwrap();
        let ops = quantize(&on_device)
            .dequantize_with_tensor_ops(DType::F32)
            .unwrap();
        assert!(ops.device().same_device(&device), "{name}");
        let ops = ops.to_device(&Device::Cpu).unwrap();
        let diff = max_abs_diff(&ops, &kernels);
        assert!(
            diff <= 1e-6,
            "{name}: the device's unpacking differs by {diff}"
        );
        // and both are the weight, within the format's error
        let err = max_abs_diff(&kernels, &on_cpu);
        assert!(err < 0.05, "{name}: quantization error {err}");
    }
}

/// A short run on the device; its loss curve.
fn curve_on_device(dir: &std::path::Path, name: &str, extra: serde_json::Value) -> Vec<(u64, f64)> {
    let data = memorisable_chat(dir, 8);
    let model = tiny_model(dir);
    let mut v = serde_json::json!({"training": {"max_steps": 8}});
    merge(&mut v, extra);
    let s = spec(&model, &data, v);
    let out = dir.join(name);
    train::run(&s, &options(&out), &mut Silent).unwrap();
    train_losses(&out)
}

use crate::helpers::app::merge;

#[test]
fn a_quantized_base_trains_on_the_device_as_the_dense_one() {
    let _composite = CompositePath::on();
    let dir = tempfile::tempdir().unwrap();
    let dense = curve_on_device(dir.path(), "dense", serde_json::json!({}));
    for (name, quantization) in [("nf4", "nf4"), ("fp4", "fp4"), ("int8", "int8")] {
        let quantized = curve_on_device(
            dir.path(),
            name,
            serde_json::json!({"quantization": {"type": quantization}}),
        );
        assert_eq!(quantized.len(), 8, "{name}");
        assert!(
            quantized.last().unwrap().1 < 0.8 * quantized[0].1,
            "{name} learns: {quantized:?}"
        );
        // the same curve within the base's quantization error
        let tolerance = if name == "int8" { 0.02 } else { 0.15 };
        for ((step, a), (_, b)) in dense.iter().zip(&quantized) {
            assert!(
                (a - b).abs() < tolerance * a.abs(),
                "{name} step {step}: dense {a} vs quantized {b}"
            );
        }
    }
}

#[test]
fn bf16_on_the_device_tracks_float32() {
    let _composite = CompositePath::on();
    let dir = tempfile::tempdir().unwrap();
    let f32_curve = curve_on_device(
        dir.path(),
        "f32",
        serde_json::json!({"compute_dtype": "f32"}),
    );
    let bf16_curve = curve_on_device(
        dir.path(),
        "bf16",
        serde_json::json!({"compute_dtype": "bf16"}),
    );
    assert_eq!(bf16_curve.len(), 8);
    for ((step, a), (_, b)) in f32_curve.iter().zip(&bf16_curve) {
        assert!(
            (a - b).abs() < 2e-2 * a.abs(),
            "step {step}: f32 {a} vs bf16 {b}"
        );
    }
}

#[test]
fn resume_on_the_device_continues_the_identical_curve() {
    let _composite = CompositePath::on();
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = memorisable_chat(dir.path(), 10);
    let s = spec(
        &model,
        &data,
        serde_json::json!({
            "lora": {"dropout": 0.1},
            "training": {"epochs": 2, "batch_size": 2, "lr_scheduler": "cosine", "warmup_steps": 2,
                         "gradient_checkpointing": true},
        }),
    );
    let straight = dir.path().join("straight");
    train::run(&s, &options(&straight), &mut Silent).unwrap();
    let full = train_losses(&straight);
    assert_eq!(full.len(), 10);
    let interrupted = dir.path().join("interrupted");
    let stopped = train::run(&s, &options(&interrupted), &mut StopAfterSteps(4)).unwrap_err();
    assert!(matches!(stopped, train::Error::Cancelled));
    let mut resume = options(&interrupted);
    resume.resume = true;
    train::run(&s, &resume, &mut Silent).unwrap();
    let resumed = train_losses(&interrupted);
    assert_eq!(resumed.len(), 10);
    for ((step, a), (_, b)) in full.iter().zip(&resumed) {
        assert_eq!(a.to_bits(), b.to_bits(), "step {step}: {a} vs {b}");
    }
}

/// Asks the run to stop once it has reported `n` steps.
struct StopAfterSteps(usize);

impl train::Reporter for StopAfterSteps {
    fn report(&mut self, event: &train::Event) {
        if matches!(event, train::Event::Step(_)) {
            self.0 = self.0.saturating_sub(1);
        }
    }
    fn should_stop(&self) -> bool {
        self.0 == 0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_trains_on_each_of_its_devices() {
    // `QTUNE_TEST_DEVICES`: the service's --devices (two CPU workers when unset; cuda:0,cuda:1
    // on a machine with two GPUs)
    let devices: Vec<String> = std::env::var("QTUNE_TEST_DEVICES")
        .unwrap_or_else(|_| "cpu,cpu".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let n = devices.len();
    let app = crate::helpers::app::spawn_app_with(|c| c.devices = devices.clone()).await;
    let body = app.job(serde_json::json!({"training": {"max_steps": 150}}));
    let ids = [app.submit(&body).await, app.submit(&body).await];
    // both run at once, each on a worker of its own
    let start = std::time::Instant::now();
    loop {
        let (_, list) = app.get("/v1/jobs?status=running").await;
        if list["data"].as_array().unwrap().len() == 2 {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "the two jobs never ran at once: {list}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // and the pool lists each device
    let workers = loop {
        let workers = app.state.db.live_workers().await.unwrap();
        if workers.len() == n || start.elapsed() > std::time::Duration::from_secs(60) {
            break workers;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(workers.len(), n, "{workers:?}");
    let names: Vec<&str> = workers.iter().map(|w| w.device.as_str()).collect();
    for d in &devices {
        assert!(names.contains(&d.as_str()), "{names:?}");
    }
    for id in &ids {
        let job = app
            .wait_status(
                id,
                &["succeeded", "failed"],
                std::time::Duration::from_secs(120),
            )
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    app.shutdown().await;
}
