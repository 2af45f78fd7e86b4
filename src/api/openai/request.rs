//! `POST /v1/fine_tuning/jobs` as the typed request OpenAI's API takes, and its translation into
//! the native [`JobSpec`]: `model` is the base (or a previous job's `fine_tuned_model`, whose
//! adapter the new job starts from and whose LoRA shape it keeps), `training_file` and
//! `validation_file` the dataset, `hyperparameters` the epochs, batch size and learning rate
//! (`learning_rate_multiplier` × [`DEFAULT_LEARNING_RATE`]), and the `qtune` object any other
//! native field. Errors name the request's own field, not the native one it became.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};

use crate::api::ApiError;
use crate::job::CheckpointRef;
use crate::spec::{
    ComputeDtype, DatasetFormat, JobSpec, RawDataset, RawEarlyStopping, RawJobSpec, RawLora,
    RawMethod, RawQuantization, RawTraining, DEFAULT_LEARNING_RATE,
};

/// The create request's body, as the `openai` SDK sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateFineTuningJob {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub training_file: Option<String>,
    #[serde(default)]
    pub validation_file: Option<String>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub hyperparameters: Option<Hyperparameters>,
    #[serde(default)]
    pub method: Option<Method>,
    /// Accepted only empty: qtune reports to no third-party service.
    #[serde(default)]
    pub integrations: Option<Vec<IgnoredAny>>,
    /// Native job spec fields beyond what OpenAI's request has (qtune's extension).
    #[serde(default)]
    pub qtune: Option<NativeFields>,
}

/// `n_epochs`, `batch_size`, `learning_rate_multiplier`: each `"auto"` or a number.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hyperparameters {
    #[serde(default)]
    pub n_epochs: Setting,
    #[serde(default)]
    pub batch_size: Setting,
    #[serde(default)]
    pub learning_rate_multiplier: Setting,
}

/// A hyperparameter's value: `None` for `"auto"` (or absent), the native default.
#[derive(Debug, Default, Clone, Copy)]
pub struct Setting(Option<f64>);

impl<'de> Deserialize<'de> for Setting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Setting, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Null => Ok(Setting(None)),
            serde_json::Value::String(s) if s == "auto" => Ok(Setting(None)),
            serde_json::Value::Number(n) => Ok(Setting(n.as_f64())),
            _ => Err(serde::de::Error::custom("must be \"auto\" or a number")),
        }
    }
}

/// `{"type": "supervised", "supervised": {"hyperparameters": …}}` or `{"type": "dpo", "dpo":
/// {"hyperparameters": {…, "beta"}}}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Method {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub supervised: Option<Supervised>,
    #[serde(default)]
    pub dpo: Option<Dpo>,
    // read so that an RFT request is refused for its `method.type`, not as an unknown field
    #[serde(default)]
    #[allow(dead_code)]
    reinforcement: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Supervised {
    #[serde(default)]
    pub hyperparameters: Option<Hyperparameters>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dpo {
    #[serde(default)]
    pub hyperparameters: Option<DpoHyperparameters>,
}

/// OpenAI's DPO hyperparameters: the supervised three and `beta`, each `"auto"` or a number.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoHyperparameters {
    #[serde(default)]
    pub n_epochs: Setting,
    #[serde(default)]
    pub batch_size: Setting,
    #[serde(default)]
    pub learning_rate_multiplier: Setting,
    #[serde(default)]
    pub beta: Setting,
}

/// The `qtune` object: native spec fields. Those the request itself sets (`model`, the files,
/// `seed`, `suffix`, `metadata`) are refused here, so that each has one place.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NativeFields {
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub dataset: Option<NativeDataset>,
    #[serde(default)]
    pub lora: Option<RawLora>,
    #[serde(default)]
    pub quantization: Option<RawQuantization>,
    #[serde(default)]
    pub compute_dtype: Option<ComputeDtype>,
    #[serde(default)]
    pub training: RawTraining,
    #[serde(default)]
    pub checkpoint_every_steps: Option<u64>,
    #[serde(default)]
    pub early_stopping: Option<RawEarlyStopping>,
    #[serde(default)]
    base_model: Option<IgnoredAny>,
    #[serde(default)]
    seed: Option<IgnoredAny>,
    #[serde(default)]
    suffix: Option<IgnoredAny>,
    #[serde(default)]
    metadata: Option<IgnoredAny>,
    #[serde(default)]
    from_checkpoint: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NativeDataset {
    #[serde(default)]
    pub format: DatasetFormat,
    #[serde(default)]
    pub validation_split: Option<f64>,
    #[serde(default)]
    url: Option<IgnoredAny>,
    #[serde(default)]
    validation_url: Option<IgnoredAny>,
}

/// What a `ft:` model name continues from: the earlier job's spec and the adapter named.
pub struct Continued {
    pub spec: JobSpec,
    pub from: CheckpointRef,
}

impl CreateFineTuningJob {
    /// The request in a JSON body; errors name the field at its path.
    pub fn from_json(body: &[u8]) -> Result<CreateFineTuningJob, ApiError> {
        if let Err(e) = serde_json::from_slice::<IgnoredAny>(body) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not JSON: {e}"),
            )
            .param("body"));
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let e = crate::spec::serde_error(&e.path().to_string(), &e.inner().to_string());
            ApiError::bad(&e.param, e.message)
        })
    }

    /// `model`, required.
    pub fn model(&self) -> Result<&str, ApiError> {
        self.model
            .as_deref()
            .filter(|m| !m.trim().is_empty())
            .ok_or_else(|| {
                ApiError::bad(
                    "model",
                    "missing: the base model (or a fine_tuned_model) to train",
                )
            })
    }

    /// `training_file`, required.
    fn training_file(&self) -> Result<String, ApiError> {
        let file = self.training_file.clone().filter(|f| !f.trim().is_empty());
        file.ok_or_else(|| {
            ApiError::bad(
                "training_file",
                "missing: the id of an uploaded training file",
            )
        })
    }

    /// The native spec this request stands for; `continued` is what a `ft:` `model` names,
    /// read by the caller from the database.
    pub fn into_spec(self, continued: Option<Continued>) -> Result<JobSpec, ApiError> {
        let model = self.model()?.to_string();
        let training_file = self.training_file()?;
        if self.integrations.as_ref().is_some_and(|i| !i.is_empty()) {
            return Err(ApiError::bad(
                "integrations",
                "qtune reports to no third-party service; watch jobs through their events",
            ));
        }
        let (hyper, hyper_param, method) = self.chosen_hyperparameters()?;
        let native = self.qtune.unwrap_or_default();
        native.refuse_request_fields()?;
        let mut training = native.training;
        let from_hyper = apply_hyperparameters(&hyper, hyper_param, &mut training)?;
        let dataset = native.dataset.unwrap_or_default();
        let (base_model, lora, from_checkpoint) = match continued {
            // the adapter continues with its own shape unless the request says otherwise
            Some(c) => {
                let lora = native.lora.unwrap_or_else(|| RawLora::from(&c.spec.lora));
                (c.spec.base_model, Some(lora), Some(c.from.to_string()))
            }
            None => (model, native.lora, None),
        };
        let raw = RawJobSpec {
            base_model,
            revision: native.revision,
            dataset: RawDataset {
                url: training_file,
                format: dataset.format,
                validation_url: self.validation_file,
                validation_split: dataset.validation_split,
            },
            method,
            lora,
            quantization: native.quantization,
            compute_dtype: native.compute_dtype,
            training,
            checkpoint_every_steps: native.checkpoint_every_steps,
            early_stopping: native.early_stopping,
            suffix: self.suffix,
            seed: self.seed,
            from_checkpoint,
            metadata: self.metadata,
        };
        JobSpec::try_from(raw).map_err(|e| {
            let param = from_hyper
                .iter()
                .find(|(native, _)| *native == e.param)
                .map(|(_, asked)| asked.clone())
                .unwrap_or_else(|| request_param(&e.param));
            ApiError::bad(&param, e.message)
        })
    }

    /// The hyperparameters given (top level, or under the method's own), with the param they
    /// were read from, and the native method (`None`: supervised).
    fn chosen_hyperparameters(
        &self,
    ) -> Result<(Hyperparameters, &'static str, Option<RawMethod>), ApiError> {
        let (under_method, param, method) = match &self.method {
            None => (None, "hyperparameters", None),
            Some(m) => m.native()?,
        };
        match (&self.hyperparameters, under_method) {
            (Some(_), Some(_)) => Err(ApiError::bad(
                "hyperparameters",
                format!("give hyperparameters either at the top level or under {param}, not both"),
            )),
            (Some(h), None) => Ok((h.clone_settings(), "hyperparameters", method)),
            (None, Some(h)) => Ok((h, param, method)),
            (None, None) => Ok((Hyperparameters::default(), "hyperparameters", method)),
        }
    }
}

impl Method {
    /// The hyperparameters under the method (with their param) and the native method it is.
    #[allow(clippy::type_complexity)]
    fn native(
        &self,
    ) -> Result<(Option<Hyperparameters>, &'static str, Option<RawMethod>), ApiError> {
        let kind = self.kind.as_deref().unwrap_or("supervised");
        let misplaced = match kind {
            "supervised" => self.dpo.as_ref().map(|_| "method.dpo"),
            _ => self.supervised.as_ref().map(|_| "method.supervised"),
        };
        if let Some(field) = misplaced {
            return Err(ApiError::bad(
                field,
                format!("does not go with method.type {kind:?}"),
            ));
        }
        match kind {
            "supervised" => {
                let h = self
                    .supervised
                    .as_ref()
                    .and_then(|s| s.hyperparameters.as_ref());
                let h = h.map(Hyperparameters::clone_settings);
                Ok((h, "method.supervised.hyperparameters", None))
            }
            "dpo" => {
                let h = self.dpo.as_ref().and_then(|d| d.hyperparameters.as_ref());
                let method = RawMethod {
                    kind: "dpo".into(),
                    beta: h.and_then(|h| h.beta.0),
                    ..Default::default()
                };
                let common = h.map(|h| Hyperparameters {
                    n_epochs: h.n_epochs,
                    batch_size: h.batch_size,
                    learning_rate_multiplier: h.learning_rate_multiplier,
                });
                Ok((common, "method.dpo.hyperparameters", Some(method)))
            }
            "reinforcement" => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_method",
                "qtune trains supervised and dpo fine-tuning (and orpo through its native \
                 API); reinforcement fine-tuning is not supported",
            )
            .param("method.type")),
            other => Err(ApiError::bad(
                "method.type",
                format!("unknown method type {other:?} (supervised or dpo)"),
            )),
        }
    }
}

impl Hyperparameters {
    fn clone_settings(&self) -> Hyperparameters {
        Hyperparameters {
            n_epochs: self.n_epochs,
            batch_size: self.batch_size,
            learning_rate_multiplier: self.learning_rate_multiplier,
        }
    }
}

impl NativeFields {
    fn refuse_request_fields(&self) -> Result<(), ApiError> {
        let set_by_request = [
            ("base_model", self.base_model.is_some(), "model"),
            ("seed", self.seed.is_some(), "seed"),
            ("suffix", self.suffix.is_some(), "suffix"),
            ("metadata", self.metadata.is_some(), "metadata"),
            (
                "from_checkpoint",
                self.from_checkpoint.is_some(),
                "model (a fine_tuned_model)",
            ),
        ];
        let dataset = self.dataset.as_ref();
        let in_dataset = [
            (
                "dataset.url",
                dataset.is_some_and(|d| d.url.is_some()),
                "training_file",
            ),
            (
                "dataset.validation_url",
                dataset.is_some_and(|d| d.validation_url.is_some()),
                "validation_file",
            ),
        ];
        for (field, given, instead) in set_by_request.into_iter().chain(in_dataset) {
            if given {
                return Err(ApiError::bad(
                    &format!("qtune.{field}"),
                    format!("set by the request's {instead}, not inside qtune"),
                ));
            }
        }
        Ok(())
    }
}

/// Sets the native training fields the hyperparameters stand for; returns which native field
/// came from which request param. A field also given under `qtune.training` is refused.
fn apply_hyperparameters(
    hyper: &Hyperparameters,
    hyper_param: &str,
    training: &mut RawTraining,
) -> Result<Vec<(String, String)>, ApiError> {
    let mut from_hyper = Vec::new();
    let settings = [
        ("n_epochs", hyper.n_epochs, "epochs"),
        ("batch_size", hyper.batch_size, "batch_size"),
        (
            "learning_rate_multiplier",
            hyper.learning_rate_multiplier,
            "learning_rate",
        ),
    ];
    for (key, Setting(value), native) in settings {
        let Some(v) = value else { continue };
        let param = format!("{hyper_param}.{key}");
        let taken = match native {
            "epochs" => training.epochs.is_some(),
            "batch_size" => training.batch_size.is_some(),
            _ => training.learning_rate.is_some(),
        };
        if taken {
            return Err(ApiError::bad(
                &param,
                format!("also set as qtune.training.{native}: give one"),
            ));
        }
        if native == "learning_rate" {
            if !(v.is_finite() && v > 0.0) {
                return Err(ApiError::bad(&param, format!("must be > 0, got {v}")));
            }
            training.learning_rate = Some(v * DEFAULT_LEARNING_RATE);
        } else {
            if v.fract() != 0.0 || v < 1.0 {
                return Err(ApiError::bad(
                    &param,
                    format!("must be a whole number ≥ 1, got {v}"),
                ));
            }
            let whole = Some(v.min(i64::MAX as f64) as i64);
            match native {
                "epochs" => training.epochs = whole,
                _ => training.batch_size = whole,
            }
        }
        from_hyper.push((format!("training.{native}"), param));
    }
    Ok(from_hyper)
}

/// The request's own field that sets a native one, where the request has one.
pub fn request_field(native: &str) -> Option<&'static str> {
    match native {
        "base_model" | "from_checkpoint" => Some("model"),
        "dataset.url" => Some("training_file"),
        "dataset.validation_url" => Some("validation_file"),
        "method.beta" => Some("method.dpo.hyperparameters.beta"),
        _ => None,
    }
}

/// The request's param a spec error names: its own field where it has one (`seed`, `suffix`
/// and `metadata` are the request's too), else the field inside `qtune`.
fn request_param(native: &str) -> String {
    match request_field(native) {
        Some(field) => field.to_string(),
        None if native == "seed" || native == "suffix" || native.starts_with("metadata") => {
            native.to_string()
        }
        None => format!("qtune.{native}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobId;

    fn spec(body: serde_json::Value) -> Result<JobSpec, ApiError> {
        CreateFineTuningJob::from_json(body.to_string().as_bytes())?.into_spec(None)
    }

    fn param(body: serde_json::Value) -> String {
        spec(body).unwrap_err().param.unwrap_or_default()
    }

    #[test]
    fn hyperparameters_become_native_training_fields() {
        let s = spec(serde_json::json!({
            "model": "m", "training_file": "file-1", "validation_file": "file-2",
            "hyperparameters": {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 5},
            "suffix": "s", "seed": 7, "metadata": {"k": "v"},
            "qtune": {"lora": {"r": 4}, "training": {"max_seq_len": 64}},
        }))
        .unwrap();
        assert_eq!(
            (s.base_model.as_str(), s.dataset.url.as_str()),
            ("m", "file-1")
        );
        assert_eq!(s.dataset.validation_url.as_deref(), Some("file-2"));
        assert_eq!((s.training.epochs, s.training.batch_size), (2, 4));
        assert!((s.training.learning_rate - 5.0 * DEFAULT_LEARNING_RATE).abs() < 1e-15);
        assert_eq!(
            (s.lora.r, s.lora.alpha, s.training.max_seq_len),
            (4, 8.0, 64)
        );
        assert_eq!((s.seed, s.suffix.as_deref()), (7, Some("s")));
        let under_method = spec(serde_json::json!({
            "model": "m", "training_file": "f",
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 5}}},
        }))
        .unwrap();
        assert_eq!(under_method.training.epochs, 5);
    }

    /// Fields added to a valid request, and the param its error must name.
    const BAD: [(&str, &str); 21] = [
        (r#"{"model": ""}"#, "model"),
        (r#"{"training_file": ""}"#, "training_file"),
        (r#"{"bogus": 1}"#, "bogus"),
        (r#"{"seed": "x"}"#, "seed"),
        (
            r#"{"suffix": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#,
            "suffix",
        ),
        (
            r#"{"hyperparameters": {"n_epochs": 0}}"#,
            "hyperparameters.n_epochs",
        ),
        (
            r#"{"hyperparameters": {"n_epochs": 1.5}}"#,
            "hyperparameters.n_epochs",
        ),
        (
            r#"{"hyperparameters": {"learning_rate_multiplier": -1}}"#,
            "hyperparameters.learning_rate_multiplier",
        ),
        (
            r#"{"hyperparameters": {"n_epochs": "many"}}"#,
            "hyperparameters.n_epochs",
        ),
        (
            r#"{"hyperparameters": {"beta": 1}}"#,
            "hyperparameters.beta",
        ),
        (
            r#"{"hyperparameters": {}, "method": {"supervised": {"hyperparameters": {}}}}"#,
            "hyperparameters",
        ),
        (r#"{"method": {"type": "reinforcement"}}"#, "method.type"),
        (r#"{"method": {"type": "grpo"}}"#, "method.type"),
        (
            r#"{"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}}"#,
            "method.dpo.hyperparameters.beta",
        ),
        (
            r#"{"method": {"type": "dpo", "supervised": {}}}"#,
            "method.supervised",
        ),
        (r#"{"integrations": [{"type": "wandb"}]}"#, "integrations"),
        (r#"{"qtune": {"lora": {"r": 0}}}"#, "qtune.lora.r"),
        (r#"{"qtune": {"base_model": "x"}}"#, "qtune.base_model"),
        (
            r#"{"qtune": {"dataset": {"url": "x"}}}"#,
            "qtune.dataset.url",
        ),
        (
            r#"{"qtune": {"training": {"bogus": 1}}}"#,
            "qtune.training.bogus",
        ),
        (
            r#"{"hyperparameters": {"n_epochs": 2}, "qtune": {"training": {"epochs": 3}}}"#,
            "hyperparameters.n_epochs",
        ),
    ];

    #[test]
    fn errors_name_the_requests_own_field() {
        for (extra, want) in BAD {
            let mut body = serde_json::json!({"model": "m", "training_file": "f"});
            let extra: serde_json::Value = serde_json::from_str(extra).unwrap();
            for (k, x) in extra.as_object().unwrap() {
                body[k] = x.clone();
            }
            assert_eq!(param(body), want, "{extra}");
        }
        let rft = spec(serde_json::json!(
            {"model": "m", "training_file": "f", "method": {"type": "reinforcement"}}
        ))
        .unwrap_err();
        assert_eq!(rft.code, "unsupported_method");
        let not_json = CreateFineTuningJob::from_json(b"{not json").unwrap_err();
        assert_eq!(
            (not_json.code, not_json.param.as_deref()),
            ("invalid_json", Some("body"))
        );
    }

    #[test]
    fn a_fine_tuned_model_continues_with_its_own_shape() {
        let earlier = JobSpec::from_json(
            r#"{"base_model": "b", "dataset": {"url": "d"}, "lora": {"r": 32, "target_modules": "all-linear"}}"#,
        )
        .unwrap();
        let from = CheckpointRef {
            job: JobId::new(),
            step: Some(20),
        };
        let req = CreateFineTuningJob::from_json(br#"{"model": "ft:b::x", "training_file": "f"}"#)
            .unwrap();
        let s = req
            .into_spec(Some(Continued {
                spec: earlier,
                from: from.clone(),
            }))
            .unwrap();
        assert_eq!((s.base_model.as_str(), s.lora.r), ("b", 32));
        assert_eq!(s.lora.target_modules.len(), 7);
        assert_eq!(s.from_checkpoint, Some(from));
    }
}
