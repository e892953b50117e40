//! Hyper-parameters of a Llama-family decoder, read from an HF `config.json`
//! (GGUF metadata is mapped onto the same struct in `gguf.rs`).

use std::path::Path;

use serde::Deserialize;
use serde_json::json;

use crate::error::{ModelError, Result};

/// The decoder families r3 runs. They share one implementation; the enum
/// only decides details such as q/k/v biases and the name written on export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Mistral,
}

impl Architecture {
    /// The `architectures[0]` string transformers expects in `config.json`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Mistral => "MistralForCausalLM",
        }
    }

    /// The `model_type` transformers expects in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Mistral => "mistral",
        }
    }

    fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            "MistralForCausalLM" => Some(Self::Mistral),
            _ => None,
        }
    }
}

/// How rotary frequencies deviate from the plain `theta^(-2i/d)` schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by a constant factor.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's piecewise frequency scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors, as llama.cpp stores them in `rope_freqs.weight`.
    Factors(Vec<f32>),
}

/// The most weights a shape may hold: past a trillion no file r3 reads is
/// real, and an unchecked product of crafted sizes aborts on allocation.
pub const MAX_PARAMETERS: u64 = 1 << 40;

/// Everything the decoder needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (always for Qwen2, optional for Llama).
    pub attention_bias: bool,
    /// Keys further back than this many positions are invisible (Mistral).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5's home for the rope base and scaling.
    rope_parameters: Option<serde_json::Value>,
    hidden_act: Option<String>,
    mlp_bias: Option<bool>,
    partial_rotary_factor: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

/// Reads a token id field that HF writes as a number, a list of numbers or null.
pub(crate) fn token_ids(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Parses an HF `config.json`, rejecting architectures the decoder does not implement.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let raw: HfConfig = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.into(),
            cause: source,
        })?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .ok_or_else(|| ModelError::invalid(path, "missing 'architectures'"))?;
        let architecture = Architecture::from_hf_name(&arch_name).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                path: path.into(),
                arch: arch_name.clone(),
            }
        })?;
        let need = |v: Option<usize>, key: &str| {
            v.filter(|&v| v > 0)
                .ok_or_else(|| ModelError::invalid(path, format!("missing or zero '{key}'")))
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let rope = Rope::read(path, &raw)?;
        reject_ignored_numerics(path, &raw)?;
        let config = Self {
            architecture,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim: raw.head_dim.unwrap_or(hidden_size / num_heads),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope.theta,
            rope_scaling: rope.scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: architecture == Architecture::Qwen2
                || raw.attention_bias.unwrap_or(false),
            sliding_window: match architecture {
                Architecture::Mistral => raw.sliding_window,
                Architecture::Qwen2 if raw.use_sliding_window == Some(true) => raw.sliding_window,
                _ => None,
            },
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
        };
        config
            .validate()
            .map_err(|m| ModelError::invalid(path, m))?;
        Ok(config)
    }

    /// Checks the relations between sizes that the decoder relies on, and
    /// the numbers it computes with: one check for the HF and GGUF paths,
    /// so that neither lets a value through that turns every logit NaN.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(format!(
                "rope_theta (GGUF: rope.freq_base) {} must be a finite number above 1",
                self.rope_theta
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(format!(
                "rms_norm_eps (GGUF: layer_norm_rms_epsilon) {} must be a number in (0, 1)",
                self.rms_norm_eps
            ));
        }
        match self.parameter_count() {
            Some(n) if n <= MAX_PARAMETERS => {}
            _ => {
                return Err(format!(
                    "the shape holds more than {MAX_PARAMETERS} parameters (vocab_size {}, hidden_size {}, intermediate_size {}, {} layers, {} heads of {}): not a model r3 can hold",
                    self.vocab_size,
                    self.hidden_size,
                    self.intermediate_size,
                    self.num_layers,
                    self.num_heads,
                    self.head_dim
                ))
            }
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even and non-zero",
                self.head_dim
            ));
        }
        if let RopeScaling::Factors(f) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return Err(format!(
                    "rope frequency factors have {} entries, expected head_dim/2 = {}",
                    f.len(),
                    self.head_dim / 2
                ));
            }
        }
        Ok(())
    }

    /// How many weights the shape holds (embeddings, every layer, the output
    /// head unless tied), or `None` when the product overflows: every size
    /// is bounded through this before anything is allocated.
    pub fn parameter_count(&self) -> Option<u64> {
        let n = |v: usize| u64::try_from(v).ok();
        let (vocab, h, mlp) = (
            n(self.vocab_size)?,
            n(self.hidden_size)?,
            n(self.intermediate_size)?,
        );
        let q = n(self.num_heads)?.checked_mul(n(self.head_dim)?)?;
        let kv = n(self.num_kv_heads)?.checked_mul(n(self.head_dim)?)?;
        let qkv = q.checked_add(kv.checked_mul(2)?)?;
        let biases = if self.attention_bias { qkv } else { 0 };
        let attention = h
            .checked_mul(qkv)?
            .checked_add(q.checked_mul(h)?)?
            .checked_add(biases)?;
        let layer = attention
            .checked_add(h.checked_mul(mlp)?.checked_mul(3)?)?
            .checked_add(h.checked_mul(2)?)?;
        let embeddings = vocab.checked_mul(h)?;
        let head = if self.tie_word_embeddings {
            0
        } else {
            embeddings
        };
        layer
            .checked_mul(n(self.num_layers)?)?
            .checked_add(embeddings)?
            .checked_add(head)?
            .checked_add(h)
    }

    /// FLOPs (2 per multiply-add) of the matrix products one token's pass
    /// through the layers takes when it attends to `context` keys (itself
    /// included), per layer summed: q/k/v `2h(q + 2kv)`, output `2qh`, the
    /// MLP `6h·mlp`, attention scores and values `4q·context`, where
    /// `q = heads·head_dim` and `kv = kv_heads·head_dim`. The output head
    /// is [`Self::head_flops`], counted where logits are computed.
    pub fn token_flops(&self, context: usize) -> f64 {
        let (h, mlp) = (self.hidden_size as f64, self.intermediate_size as f64);
        let q = (self.num_heads * self.head_dim) as f64;
        let kv = (self.num_kv_heads * self.head_dim) as f64;
        let per_layer =
            2.0 * h * (q + 2.0 * kv) + 2.0 * q * h + 6.0 * h * mlp + 4.0 * q * context as f64;
        per_layer * self.num_layers as f64
    }

    /// FLOPs of the output head for one position: `2·h·vocab`.
    pub fn head_flops(&self) -> f64 {
        2.0 * self.hidden_size as f64 * self.vocab_size as f64
    }

    /// Bytes of keys and values one row's decode step reads at `context`
    /// positions, in `bytes_per_value`.
    pub fn kv_bytes(&self, context: usize, bytes_per_value: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * context * bytes_per_value
    }

    /// Inverse rotary frequencies, one per pair of head dimensions, with the
    /// model's scaling applied: computed once so that every forward agrees.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d))
            .collect();
        let scaled: Vec<f64> = match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Factors(factors) => base
                .iter()
                .zip(factors)
                .map(|(f, s)| f / *s as f64)
                .collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen
                                - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }

    /// An HF `config.json` for this model, so that exported checkpoints load
    /// in transformers even when the input was a GGUF file.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::None | RopeScaling::Factors(_) => serde_json::Value::Null,
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        json!({
            "architectures": [self.architecture.hf_name()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "sliding_window": self.sliding_window,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
            "torch_dtype": "float32",
        })
    }
}

/// The rope base and scaling, from either layout transformers writes:
/// `rope_theta` and `rope_scaling` at the top (up to 4.x), or one
/// `rope_parameters` object (5.x). Where both are present they must agree:
/// a silently wrong base gives fluent nonsense, not an error.
struct Rope {
    theta: f64,
    scaling: RopeScaling,
}

impl Rope {
    fn read(path: &Path, raw: &HfConfig) -> Result<Self> {
        let invalid = |m: String| ModelError::invalid(path, m);
        let parameters = match &raw.rope_parameters {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Object(obj)) => {
                if !obj.contains_key("rope_type") && obj.values().all(|v| v.is_object()) {
                    let kinds: Vec<&String> = obj.keys().collect();
                    return Err(invalid(format!(
                        "rope_parameters: one set per attention type ({kinds:?}) is not supported"
                    )));
                }
                Some(obj)
            }
            Some(other) => return Err(invalid(format!("rope_parameters: not an object: {other}"))),
        };
        let nested_theta = match parameters.and_then(|p| p.get("rope_theta")) {
            None => None,
            Some(v) => Some(v.as_f64().ok_or_else(|| {
                invalid(format!("rope_parameters.rope_theta: not a number: {v}"))
            })?),
        };
        let theta = match (raw.rope_theta, nested_theta) {
            (Some(top), Some(nested)) if top != nested => {
                return Err(invalid(format!(
                    "rope_theta {top} and rope_parameters.rope_theta {nested} disagree"
                )))
            }
            (top, nested) => top.or(nested).unwrap_or(10_000.0),
        };
        if !(theta.is_finite() && theta > 1.0) {
            return Err(invalid(format!(
                "rope_theta {theta} must be a finite number above 1"
            )));
        }
        let top_scaling = parse_rope_scaling(path, "rope_scaling", raw.rope_scaling.as_ref())?;
        let nested_scaling = match parameters {
            Some(obj) => parse_rope_scaling(
                path,
                "rope_parameters",
                Some(&serde_json::Value::Object(obj.clone())),
            )?,
            None => RopeScaling::None,
        };
        let scaling = match (top_scaling, nested_scaling) {
            (RopeScaling::None, nested) => nested,
            (top, RopeScaling::None) => top,
            (top, nested) if top == nested => top,
            (top, nested) => {
                return Err(invalid(format!(
                    "rope_scaling {top:?} and rope_parameters {nested:?} disagree"
                )))
            }
        };
        Ok(Self { theta, scaling })
    }
}

/// Refuses settings that change a model's numbers but that the decoder does
/// not implement, naming the key, rather than running a different model.
fn reject_ignored_numerics(path: &Path, raw: &HfConfig) -> Result<()> {
    let invalid = |m: String| Err(ModelError::invalid(path, m));
    if let Some(act) = raw.hidden_act.as_deref() {
        if act != "silu" && act != "swish" {
            return invalid(format!("hidden_act '{act}' is not supported (silu is)"));
        }
    }
    if raw.mlp_bias == Some(true) {
        return invalid("mlp_bias = true is not supported".into());
    }
    if let Some(f) = raw.partial_rotary_factor {
        if f != 1.0 {
            return invalid(format!(
                "partial_rotary_factor {f} is not supported (1.0 is)"
            ));
        }
    }
    Ok(())
}

/// Parses the scaling part of a rope object (`rope_scaling`, or
/// transformers 5's `rope_parameters`, named by `key` in errors).
fn parse_rope_scaling(
    path: &Path,
    key: &str,
    value: Option<&serde_json::Value>,
) -> Result<RopeScaling> {
    let Some(obj) = value.and_then(|v| v.as_object()) else {
        return Ok(RopeScaling::None);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |field: &str| {
        obj.get(field)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| ModelError::invalid(path, format!("{key}: missing number '{field}'")))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(ModelError::invalid(
            path,
            format!("{key}: rope_type '{other}' is not supported (default, linear, llama3 are)"),
        )),
    }
}
