//! Log-probabilities of the trained spans (the reflections): a group's
//! shared prompt prefix is run once and forked, and log-probs are computed
//! only at the trained positions — the training forward stops at the end of
//! each reflection.

use candle_core::Tensor;
use r3_model::{KvCache, Llama};

use crate::Result;

/// log p of every trained token, concatenated row after row: row `i`
/// scores `tokens[i]` following `prefixes[i]`. When every row has the same
/// prefix (the G reflections of one failure) it is computed once and forked.
/// With `differentiable` the result stays in the autograd graph (policy);
/// without, it is computed on the fast path (reference, old policy).
pub fn span_logprobs(
    model: &Llama,
    prefixes: &[&[u32]],
    tokens: &[&[u32]],
    differentiable: bool,
) -> Result<Tensor> {
    let shared = prefixes.windows(2).all(|w| w[0] == w[1]);
    let heads: Vec<&[u32]> = if shared {
        vec![prefixes[0]]
    } else {
        prefixes.to_vec()
    };
    let longest = heads.iter().map(|h| h.len()).max().unwrap_or(0);
    let mut cache = if differentiable {
        KvCache::differentiable(&model.config, heads.len())
    } else {
        KvCache::new(&model.config, heads.len(), longest + 1)
    };
    let head_ids: Vec<&[u32]> = heads.iter().map(|h| &h[..h.len() - 1]).collect();
    if head_ids.iter().any(|h| !h.is_empty()) {
        model.forward(&head_ids, &mut cache)?;
    }
    let mut cache = if shared {
        cache.select_rows(&vec![0; tokens.len()])?
    } else {
        cache
    };
    // Each row feeds its prefix's last id and its tokens but the last:
    // outputs at those positions predict exactly the trained ids.
    let segments: Vec<Vec<u32>> = prefixes
        .iter()
        .zip(tokens)
        .map(|(p, r)| {
            std::iter::once(p[p.len() - 1])
                .chain(r[..r.len() - 1].iter().copied())
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = segments.iter().map(Vec::as_slice).collect();
    let hidden = model.forward(&refs, &mut cache)?;
    let (rows, width, size) = hidden.dims3()?;
    let positions: Vec<u32> = tokens
        .iter()
        .enumerate()
        .flat_map(|(row, r)| (width - r.len()..width).map(move |col| (row * width + col) as u32))
        .collect();
    let n = positions.len();
    let positions = Tensor::from_vec(positions, n, hidden.device())?;
    let picked = hidden
        .reshape((rows * width, size))?
        .index_select(&positions, 0)?;
    let targets: Vec<u32> = tokens.iter().flat_map(|r| r.iter().copied()).collect();
    Ok(model.token_logprobs(&picked, &targets)?)
}
