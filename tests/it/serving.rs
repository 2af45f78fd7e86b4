//! Serving many requests at once: a base's continuous batch (`qtune::inference::batch`)
//! against each request decoded alone.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use qtune::config::ServeConfig;
use qtune::inference::Models;
use qtune::train::generate::{self, Sampling};
use qtune::train::{checkpoint, model};

/// Writes a PEFT adapter over `base_dir` whose B factors are drawn from `seed` (a fresh adapter's
/// B is zero: it would decode what the base does).
fn drawn_adapter(base_dir: &std::path::Path, dir: &std::path::Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let data = crate::helpers::memorisable_chat(dir, 2);
    let spec = crate::helpers::spec(
        base_dir,
        &data,
        serde_json::json!({"lora": {"r": 4, "alpha": 32, "target_modules": "all-linear"}}),
    );
    let base = model::load_base(
        base_dir.to_str().unwrap(),
        None,
        &spec.lora,
        None,
        seed,
        &Device::Cpu,
    )
    .unwrap();
    for (i, (name, var)) in base.model.lora_vars().into_iter().enumerate() {
        if name.ends_with("lora_B") {
            let (o, r) = var.dims2().unwrap();
            let values: Vec<f32> = (0..o * r)
                .map(|k| {
                    let h = (k as u64 * 2654435761 + seed * 7919 + i as u64) % 1000;
                    (h as f32 / 1000.0 - 0.5) * 0.6
                })
                .collect();
            var.set(&Tensor::from_vec(values, (o, r), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    checkpoint::save_adapter(&dir.join("adapter"), &base.model, &spec, "tiny").unwrap();
}

/// Eight requests decoded together in one batch, over the base and three adapters, with prompts
/// from 3 to 300 tokens (the longest prefilled in two chunks while the others decode), give
/// greedily what each gives decoded alone, token for token; and they were batched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_mixed_adapters_decodes_what_each_request_decodes_alone() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = crate::helpers::tiny_model(dir.path());
    let base_name = base_dir.to_str().unwrap();
    let models = Models::new(&ServeConfig::for_data_dir(dir.path().join("data")));
    let mut served = vec![models.base(base_name).await.unwrap()];
    // the same folder spelled another way is the same loaded base, not a second copy
    let respelled = dir.path().join(".").join("model");
    let again = models.base(respelled.to_str().unwrap()).await.unwrap();
    assert!(Arc::ptr_eq(&served[0], &again), "one base per file");
    for k in 0..3u64 {
        let adapter_dir = dir.path().join(format!("adapter-{k}"));
        drawn_adapter(&base_dir, &adapter_dir, k + 1);
        let view = models
            .load_adapter(&format!("job-{k}"), base_name, &adapter_dir.join("adapter"))
            .await
            .unwrap();
        served.push(view);
    }
    let tok = served[0].tokenizer();
    let texts = [
        "hi",
        "say 1",
        "the quick brown fox",
        &"jumps over the lazy dog ".repeat(12),
        "ok",
        "what is two and two",
        "a",
        "tell me a story about a cat",
    ];
    let requests: Vec<(Arc<qtune::inference::Served>, Vec<u32>)> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (served[i % 4].clone(), tok.encode(t).unwrap()))
        .collect();
    assert!(
        requests[3].1.len() > 256,
        "a prompt longer than a prefill chunk"
    );
    let sampling = Sampling {
        max_tokens: 24,
        ..Sampling::default()
    };
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|(s, prompt)| {
            generate::generate(s.model(), s.tokenizer(), prompt, &sampling, &mut |_| true)
                .unwrap()
                .tokens
        })
        .collect();
    // each adapter changes what is decoded: the comparison can tell a row's adapter apart
    for (i, (s, prompt)) in requests.iter().enumerate().filter(|(i, _)| i % 4 != 0) {
        let base = generate::generate(
            served[0].model(),
            s.tokenizer(),
            prompt,
            &sampling,
            &mut |_| true,
        );
        assert_ne!(
            base.unwrap().tokens,
            alone[i],
            "request {i}: the adapter changes nothing"
        );
    }
    let together = futures_util::future::join_all(requests.iter().map(|(s, prompt)| {
        models.generate(
            s.clone(),
            prompt.clone(),
            sampling.clone(),
            Box::new(|_| true),
        )
    }))
    .await;
    for (i, (got, want)) in together.into_iter().zip(&alone).enumerate() {
        assert_eq!(&got.unwrap().tokens, want, "request {i}");
    }
    let peak = models.largest_batch();
    assert!(peak >= 4, "the requests were decoded {peak} at a time");
}
