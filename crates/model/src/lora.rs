//! LoRA adapters as PEFT writes and reads them: the settings
//! (`adapter_config.json`) and the tensors (`adapter_model.safetensors`,
//! `base_model.model.{projection}.lora_A.weight` `[r, in]` and `lora_B`
//! `[out, r]`), so that an adapter trained by r3 loads in PEFT and one
//! trained by PEFT loads in r3. The adapters themselves live beside the
//! frozen projections (`llama/linear.rs`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

/// The largest rank accepted before anything is allocated: past every
/// projection's smaller side of the models r3 runs (7B: 3,584), where more
/// rank adds nothing. Each model's own sides are checked when it is built.
pub const MAX_RANK: usize = 16_384;

/// The largest `lora_alpha / lora_r` accepted: PEFT's usual scales are 0.5
/// to 16, and 1e30 turned every logit into NaN.
pub const MAX_SCALE: f64 = 1_000.0;

/// The largest adapter weight accepted on load: trained adapters hold
/// values far below 1; NaN, infinities and 1e30 are corruption.
pub const MAX_ADAPTER_WEIGHT: f32 = 1e4;

use crate::error::{ModelError, Result};
use crate::formats::safetensors::read_safetensors;
use crate::weights::Weights;

/// The projections an adapter can target, by their HF names.
pub const LORA_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// An adapter's shape: rank, scale and the projections it covers.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    /// Short HF names (`q_proj`, …), in [`LORA_MODULES`] order.
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// Checks PEFT-style settings: `targets` may be `["all-linear"]`;
    /// unknown modules are refused, naming the valid ones.
    pub fn new(r: usize, alpha: f64, targets: &[String]) -> std::result::Result<Self, String> {
        if r == 0 {
            return Err("lora_r must be at least 1".into());
        }
        if r > MAX_RANK {
            return Err(format!(
                "lora_r {r} is over {MAX_RANK}; a rank past a projection's smaller side adds nothing"
            ));
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(format!("lora_alpha must be a positive number, not {alpha}"));
        }
        if alpha / r as f64 > MAX_SCALE {
            return Err(format!(
                "lora_alpha / lora_r = {alpha} / {r} is over {MAX_SCALE}: the update would swamp the base weights"
            ));
        }
        if targets.is_empty() {
            return Err("lora_target_modules is empty".into());
        }
        let all = targets.iter().any(|t| t == "all-linear");
        if let Some(unknown) = targets
            .iter()
            .find(|t| *t != "all-linear" && !LORA_MODULES.contains(&t.as_str()))
        {
            return Err(format!(
                "unknown LoRA target module '{unknown}' (valid: all-linear, {})",
                LORA_MODULES.join(", ")
            ));
        }
        let target_modules = LORA_MODULES
            .iter()
            .filter(|m| all || targets.iter().any(|t| t == *m))
            .map(|m| m.to_string())
            .collect();
        Ok(Self {
            r,
            alpha,
            target_modules,
        })
    }

    /// PEFT's scale of the update, `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Whether the projection named `hf_name` (`model.layers.0.self_attn.q_proj`)
    /// gets an adapter.
    pub fn targets(&self, hf_name: &str) -> bool {
        let short = hf_name.rsplit('.').next().unwrap_or(hf_name);
        self.target_modules.iter().any(|m| m == short)
    }

    /// `adapter_config.json` as PEFT writes it.
    pub fn to_peft_json(&self, base_model: &str) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": self.target_modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }

    /// Reads PEFT's `adapter_config.json`, refusing what r3 does not
    /// implement (DoRA, rsLoRA, per-module ranks, extra trained modules)
    /// rather than computing something else.
    pub fn from_peft_json(path: &Path, v: &Value) -> Result<Self> {
        let bad = |message: String| ModelError::invalid(path, message);
        if v.get("peft_type").and_then(Value::as_str) != Some("LORA") {
            return Err(bad("'peft_type' is not \"LORA\"".into()));
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("no 'r'".into()))?;
        let alpha = v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("no 'lora_alpha'".into()))?;
        let targets: Vec<String> = match v.get("target_modules") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|t| t.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("'target_modules' is not a list of names".into()))?,
            _ => return Err(bad("no 'target_modules'".into())),
        };
        // Set means anything but absent, null, false or empty: `"use_dora":
        // "yes"` must not pass as off.
        let set = |key: &str| match v.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(m)) => !m.is_empty(),
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        };
        let unsupported = [
            ("use_dora", set("use_dora")),
            ("use_rslora", set("use_rslora")),
            ("layer_replication", set("layer_replication")),
            ("exclude_modules", set("exclude_modules")),
            ("fan_in_fan_out", set("fan_in_fan_out")),
            (
                "bias",
                v.get("bias")
                    .is_some_and(|b| !b.is_null() && b.as_str() != Some("none")),
            ),
            (
                "rank_pattern",
                v.get("rank_pattern")
                    .and_then(Value::as_object)
                    .is_some_and(|m| !m.is_empty()),
            ),
            (
                "alpha_pattern",
                v.get("alpha_pattern")
                    .and_then(Value::as_object)
                    .is_some_and(|m| !m.is_empty()),
            ),
            (
                "modules_to_save",
                v.get("modules_to_save").is_some_and(|m| !m.is_null()),
            ),
            (
                "layers_to_transform",
                v.get("layers_to_transform").is_some_and(|m| !m.is_null()),
            ),
        ];
        if let Some((key, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(bad(format!(
                "'{key}' is set; r3 implements plain LoRA only"
            )));
        }
        Self::new(r as usize, alpha, &targets).map_err(bad)
    }
}

/// PEFT's names of the A and B matrices of projection `hf_name`.
pub fn peft_names(hf_name: &str) -> [String; 2] {
    ["lora_A", "lora_B"].map(|m| format!("base_model.model.{hf_name}.{m}.weight"))
}

/// An adapter directory: its settings, the base it was trained on
/// (`base_model_name_or_path`; `None` when empty or absent) and its tensors
/// by PEFT name.
pub struct Adapter {
    pub config: LoraConfig,
    pub base_model: Option<String>,
    pub weights: Weights,
}

impl Adapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: config_path.clone(),
            cause: source,
        })?;
        let config = LoraConfig::from_peft_json(&config_path, &json)?;
        let base_model = json["base_model_name_or_path"]
            .as_str()
            .filter(|b| !b.is_empty())
            .map(str::to_string);
        let tensors_path = dir.join(TENSORS_FILE);
        if !tensors_path.exists() {
            return Err(ModelError::invalid(
                &tensors_path,
                "missing: not a PEFT adapter directory",
            ));
        }
        let tensors: HashMap<String, Tensor> =
            read_safetensors(&tensors_path)?.into_iter().collect();
        Ok(Self {
            config,
            base_model,
            weights: Weights::new(tensors_path, tensors),
        })
    }

    /// Writes this adapter's two PEFT files into `dir` with its tensors in
    /// `dtype` (f32 or bf16): a training checkpoint's optimizer and
    /// trainer state stay behind, and bf16 halves the file, for sharing an
    /// adapter (PEFT and r3 load either).
    pub fn export(mut self, dir: &Path, dtype: DType) -> Result<()> {
        write_config(dir, &self.config, self.base_model.as_deref().unwrap_or(""))?;
        self.weights.set_dtype(dtype)?;
        self.weights.save_safetensors(&dir.join(TENSORS_FILE))
    }

    /// Writes the adapter as PEFT does (each file atomically).
    pub fn save(
        dir: &Path,
        config: &LoraConfig,
        base_model: &str,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<()> {
        write_config(dir, config, base_model)?;
        Weights::new(dir, tensors.clone()).save_safetensors(&dir.join(TENSORS_FILE))
    }
}

/// PEFT's file of adapter tensors.
const TENSORS_FILE: &str = "adapter_model.safetensors";

/// `dir/adapter_config.json`, atomically.
fn write_config(dir: &Path, config: &LoraConfig, base_model: &str) -> Result<()> {
    let path = dir.join("adapter_config.json");
    let text =
        serde_json::to_string_pretty(&config.to_peft_json(base_model)).expect("serialisable");
    crate::atomic::write_atomic(&path, text.as_bytes()).map_err(|e| ModelError::io(&path, e))
}
