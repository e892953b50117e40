//! The model's tokenizer: HF `tokenizer.json`, or rebuilt from GGUF metadata
//! so that it encodes exactly as the model's own `tokenizer.json` would.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{ModelError, Result};
use crate::formats::gguf::GgufFile;

/// A tokenizer plus the special ids generation needs. Prompts are always
/// encoded without adding special tokens: the chat template writes them.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

/// Llama 3's pre-tokenizer split (llama.cpp's "llama-bpe").
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: like Llama 3's but one digit at a time.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::invalid(path, format!("cannot load tokenizer: {e}")))?;
        Ok(Self { inner })
    }

    /// Rebuilds a byte-level BPE tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let path = &gguf.path;
        let model = gguf.get_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(ModelError::invalid(
                path,
                format!("tokenizer.ggml.model '{model}' is not supported (only byte-level BPE, 'gpt2', is)"),
            ));
        }
        let tokens = string_array(gguf, "tokenizer.ggml.tokens")?;
        let merges = string_array(gguf, "tokenizer.ggml.merges")?;
        let token_types: Vec<i64> = match gguf.metadata().get("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::invalid(path, format!("malformed merge '{m}'")))
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| ModelError::invalid(path, format!("cannot build BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("default");
        inner.with_pre_tokenizer(Some(pre_tokenizer(path, pre)?));
        inner.with_decoder(Some(ByteLevel::default()));
        // Control (3) and user-defined (4) tokens are matched before BPE, as
        // tokenizer.json's added_tokens are.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, &ty)| ty == 3 || ty == 4)
            .map(|(t, &ty)| AddedToken::from(t.clone(), ty == 3))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| ModelError::invalid(path, format!("cannot add special tokens: {e}")))?;
        Ok(Self { inner })
    }

    /// Token ids of `text`, special-token markers in the text included.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens kept so that decoded turns compare
    /// exactly with the rendered chat template.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids the tokenizer can produce, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Writes an HF `tokenizer.json`, for exported checkpoints.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| ModelError::invalid(path, format!("cannot save tokenizer: {e}")))
    }
}

fn string_array(gguf: &GgufFile, key: &str) -> Result<Vec<String>> {
    match gguf.metadata().get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(ModelError::invalid(
                    &gguf.path,
                    format!("'{key}' holds a non-string"),
                )),
            })
            .collect(),
        _ => Err(ModelError::invalid(
            &gguf.path,
            format!("missing metadata array '{key}'"),
        )),
    }
}

/// The pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`, as the matching
/// HF `tokenizer.json` defines it.
fn pre_tokenizer(path: &Path, name: &str) -> Result<PreTokenizerWrapper> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| ModelError::invalid(path, format!("pre-tokenizer regex: {e}")))?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    match name {
        "default" | "gpt2" => Ok(ByteLevel::new(false, true, true).into()),
        "smollm" => Ok(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into()),
        "llama-bpe" | "llama3" => split(LLAMA3_REGEX),
        "qwen2" => split(QWEN2_REGEX),
        other => Err(ModelError::invalid(
            path,
            format!("pre-tokenizer '{other}' is not supported (default, gpt2, smollm, llama-bpe, qwen2 are)"),
        )),
    }
}
