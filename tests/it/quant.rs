//! QLoRA through the engine's entry point: every quantized type trains the tiny model, and a
//! half-precision compute dtype is refused on the CPU. The quantization kernels' own tests (NF4
//! bit for bit against bitsandbytes, double quantization, the quantized linear's gradient) are
//! unit tests beside them, in src/train/quant/tests.rs.

use candle_core::Device;

#[test]
fn qlora_on_the_tiny_model_lowers_the_loss_for_every_type() {
    for kind in ["nf4", "fp4", "int8"] {
        let dir = tempfile::tempdir().unwrap();
        let model = crate::helpers::tiny_model(dir.path());
        let data = crate::helpers::memorisable_chat(dir.path(), 8);
        let spec = crate::helpers::spec(
            &model,
            &data,
            serde_json::json!({
                "quantization": {"type": kind},
                "lora": {"target_modules": "all-linear", "r": 8},
                "training": {"epochs": 12, "batch_size": 4},
            }),
        );
        let out = dir.path().join("out");
        qtune::train::run(
            &spec,
            &crate::helpers::run_options(&out),
            &mut qtune::train::Silent,
        )
        .unwrap();
        let losses = crate::helpers::train_losses(&out);
        let (first, last) = (
            losses[0].1,
            losses.iter().rev().take(4).map(|l| l.1).sum::<f64>() / 4.0,
        );
        assert!(last < 0.5 * first, "{kind}: loss {first:.3} -> {last:.3}");
        // the base really is quantized: no dense linear weight is held
        let base = qtune::train::model::load_base(
            model.to_str().unwrap(),
            None,
            &spec.lora,
            spec.quantization.as_ref(),
            0,
            &Device::Cpu,
        )
        .unwrap();
        for block in &base.model.blocks {
            for (_, l) in block.linears() {
                assert!(
                    matches!(l.weight, qtune::train::model::FrozenWeight::Quantized(_)),
                    "{kind}"
                );
            }
        }
    }
}

#[test]
fn half_precision_compute_is_refused_on_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::helpers::tiny_model(dir.path());
    let data = crate::helpers::memorisable_chat(dir.path(), 4);
    let spec = crate::helpers::spec(
        &model,
        &data,
        serde_json::json!({"quantization": {"bits": 4, "compute_dtype": "bf16"}}),
    );
    let err = qtune::train::run(
        &spec,
        &crate::helpers::run_options(&dir.path().join("out")),
        &mut qtune::train::Silent,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("quantization.compute_dtype bf16 needs a CUDA device"),
        "{err}"
    );
}
