//! The KV cache: per-layer keys/values for a batch of rows, plus which cache
//! columns each row actually uses.
//!
//! Rows of different lengths are right-aligned: when a batch appends segments
//! of different lengths, the shorter ones are left-padded with *holes* —
//! columns no query may attend to. Prefilling a fresh batch (left padding),
//! appending a new chat turn to every row, and one-token decode steps are all
//! the same operation. Rows can be dropped, forked (one prefix, G copies) and
//! concatenated again.

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;

/// Large negative but finite, so a row with no visible key stays finite.
const MASKED: f32 = -1e9;

/// How the cache stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Storage {
    /// Preallocated buffers written in place: no copy per decode step, but
    /// no gradient either. For generation.
    Buffer,
    /// Concatenated tensors that stay in candle's autograd graph, so that a
    /// shared prefix computed once still receives gradients. For training.
    Differentiable,
}

#[derive(Debug, Clone)]
struct Row {
    /// Rotary position of each cache column; `None` for a hole.
    positions: Vec<Option<u32>>,
    next_position: u32,
}

/// Keys and values of every layer for a batch of rows.
#[derive(Debug, Clone)]
pub struct KvCache {
    storage: Storage,
    /// Per layer: keys and values `[batch, kv_heads, capacity, head_dim]`
    /// (`capacity == len` when differentiable). `None` until first written.
    layers: Vec<Option<(Tensor, Tensor)>>,
    rows: Vec<Row>,
    len: usize,
    /// Columns to allocate on first write, so decoding does not regrow.
    initial_capacity: usize,
    sliding_window: Option<usize>,
    kv_heads: usize,
    head_dim: usize,
}

/// What one forward over new tokens needs from the cache, computed before
/// the layers run: token ids laid out `[batch, t]`, rotary positions and the
/// additive attention mask `[batch, 1, 1, t, len]`.
pub(crate) struct AppendPlan {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub mask: Vec<f32>,
    pub t: usize,
}

impl KvCache {
    /// An empty cache for generation, with room for `capacity` columns
    /// before it has to grow.
    pub fn new(config: &ModelConfig, batch: usize, capacity: usize) -> Self {
        Self::empty(config, batch, Storage::Buffer, capacity)
    }

    /// An empty cache whose contents stay differentiable (training forward).
    pub fn differentiable(config: &ModelConfig, batch: usize) -> Self {
        Self::empty(config, batch, Storage::Differentiable, 0)
    }

    fn empty(config: &ModelConfig, batch: usize, storage: Storage, capacity: usize) -> Self {
        Self {
            storage,
            layers: vec![None; config.num_layers],
            rows: vec![
                Row {
                    positions: Vec::with_capacity(capacity),
                    next_position: 0,
                };
                batch
            ],
            len: 0,
            initial_capacity: capacity,
            sliding_window: config.sliding_window,
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
        }
    }

    pub fn batch(&self) -> usize {
        self.rows.len()
    }

    /// Number of columns, holes included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Registers one segment of new tokens per row and returns the inputs of
    /// the forward that will fill them in. Shorter segments are left-padded
    /// with holes (token id 0, never attended to).
    pub(crate) fn plan_append(&mut self, segments: &[&[u32]]) -> AppendPlan {
        let batch = self.batch();
        assert_eq!(segments.len(), batch, "one segment per cache row");
        let t = segments.iter().map(|s| s.len()).max().unwrap_or(0);
        let start = self.len;
        let total = start + t;
        let mut tokens = vec![0u32; batch * t];
        let mut positions = vec![0u32; batch * t];
        let mut mask = vec![MASKED; batch * t * total];
        for (r, (row, segment)) in self.rows.iter_mut().zip(segments).enumerate() {
            let pad = t - segment.len();
            row.positions.extend(std::iter::repeat_n(None, pad));
            for (i, &token) in segment.iter().enumerate() {
                tokens[r * t + pad + i] = token;
                positions[r * t + pad + i] = row.next_position;
                row.positions.push(Some(row.next_position));
                row.next_position += 1;
            }
            for q in 0..t {
                let Some(query_position) = row.positions[start + q] else {
                    continue;
                };
                let mask_row = &mut mask[(r * t + q) * total..(r * t + q + 1) * total];
                for (key, slot) in row.positions[..=start + q].iter().enumerate() {
                    let visible = match (slot, self.sliding_window) {
                        (None, _) => false,
                        (Some(_), None) => true,
                        (Some(p), Some(w)) => ((query_position - p) as usize) < w,
                    };
                    if visible {
                        mask_row[key] = 0.0;
                    }
                }
            }
        }
        self.len = total;
        AppendPlan {
            tokens,
            positions,
            mask,
            t,
        }
    }

    /// Stores the newest `t` columns of keys/values of `layer` and returns the
    /// keys and values of all `len` columns `[batch, kv_heads, len, head_dim]`.
    pub(crate) fn append_layer(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let start = self.len - t;
        if self.storage == Storage::Differentiable {
            let (k, v) = match self.layers[layer].take() {
                None => (k, v),
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            };
            self.layers[layer] = Some((k.clone(), v.clone()));
            return Ok((k, v));
        }
        let capacity = match &self.layers[layer] {
            Some((kb, _)) => kb.dim(2)?,
            None => 0,
        };
        if self.len > capacity {
            let grown = self.len.max(capacity * 2).max(self.initial_capacity);
            let (kb, vb) = (self.zeros(grown)?, self.zeros(grown)?);
            if let Some((old_k, old_v)) = self.layers[layer].take() {
                kb.slice_set(&old_k.narrow(2, 0, start)?.contiguous()?, 2, 0)?;
                vb.slice_set(&old_v.narrow(2, 0, start)?.contiguous()?, 2, 0)?;
            }
            self.layers[layer] = Some((kb, vb));
        }
        let (kb, vb) = self.layers[layer].as_ref().expect("allocated above");
        kb.slice_set(&k, 2, start)?;
        vb.slice_set(&v, 2, start)?;
        Ok((kb.narrow(2, 0, self.len)?, vb.narrow(2, 0, self.len)?))
    }

    fn zeros(&self, capacity: usize) -> Result<Tensor> {
        Ok(Tensor::zeros(
            (self.batch(), self.kv_heads, capacity, self.head_dim),
            DType::F32,
            &Device::Cpu,
        )?)
    }

    /// A cache holding the given rows, in that order; a row may repeat, which
    /// is how one prefix is forked into G continuations. Leading columns that
    /// are holes in every kept row are dropped.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        self.gather_rows(rows, self.capacity())
    }

    /// One row alone, with no spare capacity: how a finished row's cache is
    /// kept until its conversation continues, at the smallest memory cost.
    pub fn take_row(&self, row: usize) -> Result<Self> {
        self.gather_rows(&[row], 0)
    }

    fn gather_rows(&self, rows: &[usize], capacity: usize) -> Result<Self> {
        let first_used = rows
            .iter()
            .map(|&r| {
                self.rows[r]
                    .positions
                    .iter()
                    .position(Option::is_some)
                    .unwrap_or(self.len)
            })
            .min()
            .unwrap_or(0);
        let len = self.len - first_used;
        let index = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            &Device::Cpu,
        )?;
        let mut out = Self {
            storage: self.storage,
            layers: Vec::with_capacity(self.layers.len()),
            rows: rows
                .iter()
                .map(|&r| Row {
                    positions: self.rows[r].positions[first_used..].to_vec(),
                    next_position: self.rows[r].next_position,
                })
                .collect(),
            len,
            initial_capacity: self.initial_capacity,
            sliding_window: self.sliding_window,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        };
        for layer in &self.layers {
            let selected = match layer {
                None => None,
                Some((k, v)) => {
                    let pick = |x: &Tensor| -> Result<Tensor> {
                        let x = x.index_select(&index, 0)?.narrow(2, first_used, len)?;
                        out.restore_capacity(x, capacity)
                    };
                    Some((pick(k)?, pick(v)?))
                }
            };
            out.layers.push(selected);
        }
        Ok(out)
    }

    /// Rows of several caches in one batch, right-aligned: shorter caches get
    /// leading holes. The retry turns of many reflections run as one batch.
    pub fn concat(caches: &[Self]) -> Result<Self> {
        let first = caches.first().expect("concat needs at least one cache");
        let len = caches.iter().map(|c| c.len).max().unwrap_or(0);
        let mut out = Self {
            storage: first.storage,
            layers: Vec::with_capacity(first.layers.len()),
            rows: Vec::new(),
            len,
            initial_capacity: first.initial_capacity,
            sliding_window: first.sliding_window,
            kv_heads: first.kv_heads,
            head_dim: first.head_dim,
        };
        for cache in caches {
            for row in &cache.rows {
                let mut positions = vec![None; len - cache.len];
                positions.extend_from_slice(&row.positions);
                out.rows.push(Row {
                    positions,
                    next_position: row.next_position,
                });
            }
        }
        let capacity = caches.iter().map(Self::capacity).max().unwrap_or(len);
        for layer in 0..first.layers.len() {
            let mut keys = Vec::with_capacity(caches.len());
            let mut values = Vec::with_capacity(caches.len());
            for cache in caches {
                let (k, v) = match &cache.layers[layer] {
                    Some((k, v)) => (k.narrow(2, 0, cache.len)?, v.narrow(2, 0, cache.len)?),
                    None => (cache.zeros(0)?, cache.zeros(0)?),
                };
                keys.push(left_pad(&k, len - cache.len)?);
                values.push(left_pad(&v, len - cache.len)?);
            }
            let k = out.restore_capacity(Tensor::cat(&keys, 0)?, capacity)?;
            let v = out.restore_capacity(Tensor::cat(&values, 0)?, capacity)?;
            out.layers.push(Some((k, v)));
        }
        Ok(out)
    }

    fn capacity(&self) -> usize {
        match &self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(self.len),
            _ => self.len,
        }
    }

    /// Gives a freshly gathered `[b, h, len, d]` tensor back its spare
    /// columns, so that decoding after a select does not regrow at once.
    fn restore_capacity(&self, x: Tensor, capacity: usize) -> Result<Tensor> {
        if self.storage == Storage::Differentiable || capacity <= self.len {
            return Ok(x);
        }
        let buffer = Tensor::zeros(
            (x.dim(0)?, self.kv_heads, capacity, self.head_dim),
            DType::F32,
            &Device::Cpu,
        )?;
        buffer.slice_set(&x.contiguous()?, 2, 0)?;
        Ok(buffer)
    }
}

fn left_pad(x: &Tensor, pad: usize) -> Result<Tensor> {
    if pad == 0 {
        return Ok(x.clone());
    }
    let (b, h, _, d) = x.dims4()?;
    let zeros = Tensor::zeros((b, h, pad, d), x.dtype(), x.device())?;
    Ok(Tensor::cat(&[&zeros, x], 2)?)
}
