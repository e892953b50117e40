//! The KV cache: per-layer keys/values for a batch of rows, plus which cache
//! columns each row actually uses.
//!
//! Rows share one axis of columns, and a column a row does not use is a
//! *hole* for it, which no query of the row attends to. Each new segment
//! goes right after its row's last token: into the row's trailing holes
//! where they reach, so that a row joining a running batch fills the
//! columns it has not used rather than widening every row, and the axis
//! grows only by what the row furthest along needs (a training cache, whose
//! keys and values are concatenated, appends every segment after all
//! columns instead, right-aligned). Prefilling a fresh batch, appending a
//! new chat turn to every row, and one-token decode steps are all the same
//! operation. A prefix can be forked into G rows, and a row that has
//! finished decoding can leave the forwards while keeping its keys and
//! values in place, to continue later with the next turn of its
//! conversation.

use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

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

impl Row {
    /// The column after the row's last token: where its next segment goes.
    fn end(&self) -> usize {
        self.positions
            .iter()
            .rposition(Option::is_some)
            .map_or(0, |last| last + 1)
    }
}

/// Where the forward being run writes its keys and values: one block of
/// columns for every row, or per slot of its `[batch, t]` query grid.
#[derive(Debug, Clone)]
enum Placement {
    /// Every row's segment fills columns `start..start + t`.
    Block { start: usize },
    /// Slot `(r, i)` goes to column `columns[r * t + i]` (`u32::MAX`, a
    /// padding slot, goes nowhere); `index` is that broadcast over heads
    /// and head dims, built at the first layer.
    Scattered {
        columns: Vec<u32>,
        index: Option<Tensor>,
    },
}

/// Keys and values of every layer for a batch of rows.
#[derive(Debug, Clone)]
pub struct KvCache {
    storage: Storage,
    /// Per layer: keys and values `[batch, kv_heads, capacity, head_dim]`
    /// (`capacity == len` when differentiable). `None` until first written.
    layers: Vec<Option<(Tensor, Tensor)>>,
    rows: Vec<Row>,
    /// Rows `0..active` take part in forwards; the rest are set aside.
    active: usize,
    /// The row each slot held when every row was last active, so that
    /// [`KvCache::activate_all`] can put them back in order.
    order: Vec<usize>,
    len: usize,
    /// Columns to allocate on first write, so decoding does not regrow.
    initial_capacity: usize,
    /// Rows the buffers hold (at least `rows.len()`): rows that join a
    /// running batch take spare ones, so a join copies nothing.
    row_capacity: usize,
    sliding_window: Option<usize>,
    kv_heads: usize,
    head_dim: usize,
    /// Where the planned forward's keys and values go.
    placement: Placement,
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
    /// (at most the model's context) before it has to grow.
    pub fn new(config: &ModelConfig, batch: usize, capacity: usize) -> Self {
        let capacity = capacity.min(config.max_position_embeddings);
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
            active: batch,
            order: (0..batch).collect(),
            len: 0,
            initial_capacity: capacity,
            row_capacity: batch,
            sliding_window: config.sliding_window,
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            placement: Placement::Block { start: 0 },
        }
    }

    /// Whether the keys and values stay in autograd's graph: a training
    /// forward's cache (see [`crate::exec::Exec::of`]).
    pub fn is_differentiable(&self) -> bool {
        self.storage == Storage::Differentiable
    }

    /// Rows taking part in forwards: one segment each.
    pub fn batch(&self) -> usize {
        self.active
    }

    /// All rows, set-aside ones included.
    pub fn rows(&self) -> usize {
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
    /// the forward that will fill them in. The segments are laid out
    /// `[batch, t]`, shorter ones left-padded (token id 0, a slot that is
    /// written nowhere and that no query attends to).
    pub(crate) fn plan_append(&mut self, segments: &[&[u32]]) -> AppendPlan {
        let batch = self.batch();
        assert_eq!(segments.len(), batch, "one segment per active cache row");
        let t = segments.iter().map(|s| s.len()).max().unwrap_or(0);
        let start = self.len;
        // The first column of each row's segment.
        let firsts: Vec<usize> = match self.storage {
            Storage::Buffer => self.rows[..batch].iter().map(Row::end).collect(),
            Storage::Differentiable => segments.iter().map(|s| start + t - s.len()).collect(),
        };
        let total = firsts
            .iter()
            .zip(segments)
            .map(|(first, s)| first + s.len())
            .fold(start, usize::max);
        for row in &mut self.rows {
            row.positions.resize(total, None);
        }
        let block = firsts
            .iter()
            .zip(segments)
            .all(|(&first, s)| s.len() == t && first == total - t);
        let mut columns = vec![u32::MAX; if block { 0 } else { batch * t }];
        let mut tokens = vec![0u32; batch * t];
        let mut positions = vec![0u32; batch * t];
        let mut mask = vec![MASKED; batch * t * total];
        for (r, (row, segment)) in self.rows.iter_mut().zip(segments).enumerate() {
            let pad = t - segment.len();
            for (i, &token) in segment.iter().enumerate() {
                let (slot, column) = (r * t + pad + i, firsts[r] + i);
                tokens[slot] = token;
                positions[slot] = row.next_position;
                row.positions[column] = Some(row.next_position);
                row.next_position += 1;
                if !block {
                    columns[slot] = column as u32;
                }
            }
            for i in 0..segment.len() {
                let (slot, column) = (r * t + pad + i, firsts[r] + i);
                let query_position = positions[slot];
                let mask_row = &mut mask[slot * total..(slot + 1) * total];
                for (key, key_position) in row.positions[..=column].iter().enumerate() {
                    let visible = match (key_position, self.sliding_window) {
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
        self.placement = match block {
            true => Placement::Block { start: total - t },
            false => Placement::Scattered {
                columns,
                index: None,
            },
        };
        AppendPlan {
            tokens,
            positions,
            mask,
            t,
        }
    }

    /// Stores the planned forward's keys/values of `layer` `[batch,
    /// kv_heads, t, head_dim]` where [`KvCache::plan_append`] placed them,
    /// and returns the keys and values of all `len` columns `[batch,
    /// kv_heads, len, head_dim]`.
    pub(crate) fn append_layer(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
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
            let (kb, vb) = (self.zeros(grown, &k)?, self.zeros(grown, &v)?);
            if let Some((old_k, old_v)) = self.layers[layer].take() {
                kb.slice_set(&old_k.contiguous()?, 2, 0)?;
                vb.slice_set(&old_v.contiguous()?, 2, 0)?;
            }
            self.layers[layer] = Some((kb, vb));
        }
        let (kb, vb) = self.layers[layer].as_ref().expect("allocated above");
        let (kb, vb) = (kb.narrow(0, 0, self.active)?, vb.narrow(0, 0, self.active)?);
        match &mut self.placement {
            Placement::Block { start } => {
                kb.slice_set(&k, 2, *start)?;
                vb.slice_set(&v, 2, *start)?;
            }
            Placement::Scattered { columns, index } => {
                if index.is_none() {
                    let (b, _, _, d) = k.dims4()?;
                    let grid = Tensor::from_slice(columns, (b, 1, t, 1), k.device())?;
                    *index = Some(grid.broadcast_as((b, self.kv_heads, t, d))?.contiguous()?);
                }
                // candle's scatter (CPU and CUDA) skips a `u32::MAX` index:
                // padding slots write nothing.
                let index = index.as_ref().expect("built above");
                kb.scatter_set(index, &k.contiguous()?, 2)?;
                vb.scatter_set(index, &v.contiguous()?, 2)?;
            }
        }
        Ok((kb.narrow(2, 0, self.len)?, vb.narrow(2, 0, self.len)?))
    }

    /// Detaches `layer`'s keys and values from autograd, so that a forward
    /// run for its values alone (training's checkpointed forward) frees
    /// each layer's graph as it goes.
    pub fn detach_layer(&mut self, layer: usize) {
        if let Some((k, v)) = &mut self.layers[layer] {
            (*k, *v) = (k.detach(), v.detach());
        }
    }

    /// A zeroed buffer of `capacity` columns for every row, of `like`'s
    /// type and on its device.
    fn zeros(&self, capacity: usize, like: &Tensor) -> Result<Tensor> {
        Ok(Tensor::zeros(
            (self.row_capacity, self.kv_heads, capacity, self.head_dim),
            like.dtype(),
            like.device(),
        )?)
    }

    /// A cache holding the given rows, in that order; a row may repeat, which
    /// is how one prefix is forked into G continuations. Leading columns that
    /// are holes in every kept row are dropped; `capacity` columns (at least
    /// the length) are allocated, so that decoding after the fork does not
    /// regrow. Every row must be active.
    pub fn select_rows(&self, rows: &[usize], capacity: usize) -> Result<Self> {
        if self.active != self.rows.len() {
            return Err(ModelError::Cache(
                "select_rows needs every row active".into(),
            ));
        }
        self.gather(rows, capacity)
    }

    /// [`KvCache::select_rows`] without its check: the rows given become
    /// the new cache's rows, all active, in that order.
    fn gather(&self, rows: &[usize], capacity: usize) -> Result<Self> {
        // The columns some kept row uses; the others (holes in every kept
        // row, as a finished row's leave behind) are dropped.
        let used: Vec<usize> = (0..self.len)
            .filter(|&c| rows.iter().any(|&r| self.rows[r].positions[c].is_some()))
            .collect();
        let len = used.len();
        // A contiguous run (the usual case: leading holes only) is a view.
        let first = used.first().copied().unwrap_or(self.len);
        let contiguous = used.last().is_none_or(|&last| last + 1 - first == len);
        let device = match self.layers.iter().flatten().next() {
            Some((k, _)) => k.device().clone(),
            None => Device::Cpu,
        };
        let index = |ids: &[usize]| {
            let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
            let n = ids.len();
            Tensor::from_vec(ids, n, &device)
        };
        let row_index = index(rows)?;
        let column_index = match contiguous {
            true => None,
            false => Some(index(&used)?),
        };
        let mut out = Self {
            storage: self.storage,
            layers: Vec::with_capacity(self.layers.len()),
            rows: rows
                .iter()
                .map(|&r| Row {
                    positions: used.iter().map(|&c| self.rows[r].positions[c]).collect(),
                    next_position: self.rows[r].next_position,
                })
                .collect(),
            active: rows.len(),
            order: (0..rows.len()).collect(),
            len,
            initial_capacity: self.initial_capacity,
            row_capacity: rows.len(),
            sliding_window: self.sliding_window,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            placement: Placement::Block { start: 0 },
        };
        for layer in &self.layers {
            let selected = match layer {
                None => None,
                Some((k, v)) => {
                    let pick = |x: &Tensor| -> Result<Tensor> {
                        let x = x.index_select(&row_index, 0)?;
                        let x = match &column_index {
                            None => x.narrow(2, first, len)?,
                            Some(columns) => x.index_select(columns, 2)?,
                        };
                        out.with_capacity(x, capacity)
                    };
                    Some((pick(k)?, pick(v)?))
                }
            };
            out.layers.push(selected);
        }
        Ok(out)
    }

    /// Sets active row `slot` aside: later forwards skip it, its keys and
    /// values stay. (It trades places with the last active row, whose slot
    /// number changes accordingly.) Finished rows leave a decode batch this
    /// way and continue later with [`KvCache::activate_all`].
    pub fn deactivate(&mut self, slot: usize) -> Result<()> {
        if self.storage == Storage::Differentiable || slot >= self.active {
            return Err(ModelError::Cache(format!(
                "cannot set aside row {slot} of {} active rows",
                self.active
            )));
        }
        let last = self.active - 1;
        self.swap_rows(slot, last)?;
        self.active = last;
        Ok(())
    }

    /// Adds `n` rows that have seen nothing (a hole in every column so
    /// far), active, after the active ones: requests joining a running
    /// batch, whose first segment the next forward appends.
    pub fn add_rows(&mut self, n: usize) -> Result<()> {
        if self.storage == Storage::Differentiable {
            return Err(ModelError::Cache(
                "rows join only a generation cache".into(),
            ));
        }
        let old = self.rows.len();
        if old + n > self.row_capacity {
            // Grown by half again at least, so that joins one at a time
            // copy the cache a logarithmic number of times.
            let grown = (old + n).max(self.row_capacity + self.row_capacity / 2);
            for layer in self.layers.iter_mut().flatten() {
                for x in [&mut layer.0, &mut layer.1] {
                    let (_, heads, capacity, dim) = x.dims4()?;
                    let bigger =
                        Tensor::zeros((grown, heads, capacity, dim), x.dtype(), x.device())?;
                    bigger.slice_set(&x.narrow(0, 0, old)?.contiguous()?, 0, 0)?;
                    *x = bigger;
                }
            }
            self.row_capacity = grown;
        }
        // A spare row may still hold a dropped row's keys and values: finite
        // numbers in columns the new row never attends to (a hole's weight
        // is exactly 0), so they need no clearing.
        for row in old..old + n {
            self.rows.push(Row {
                positions: vec![None; self.len],
                next_position: 0,
            });
            self.order.push(row);
            self.swap_rows(self.active, row)?;
            self.active += 1;
        }
        Ok(())
    }

    /// Makes set-aside row `slot` active again, as the last active slot
    /// (whose number it returns): a finished row continuing with its next
    /// turn.
    pub fn reactivate(&mut self, slot: usize) -> Result<usize> {
        if slot < self.active || slot >= self.rows.len() {
            return Err(ModelError::Cache(format!(
                "row {slot} is not set aside ({} active of {})",
                self.active,
                self.rows.len()
            )));
        }
        self.swap_rows(slot, self.active)?;
        self.active += 1;
        Ok(self.active - 1)
    }

    /// Keeps only the rows listed, in that order, the active ones first
    /// (they stay active, the others set aside), and drops the leading
    /// columns none of them uses: the memory of finished rows, freed. The
    /// column capacity stays.
    pub fn retain_rows(&mut self, keep: &[usize]) -> Result<()> {
        let active = keep.iter().take_while(|&&r| r < self.active).count();
        if keep[active..]
            .iter()
            .any(|&r| r < self.active || r >= self.rows.len())
        {
            return Err(ModelError::Cache(
                "retain_rows lists the active rows first, then set-aside ones".into(),
            ));
        }
        if keep.is_empty() {
            self.layers.iter_mut().for_each(|l| *l = None);
            (self.rows, self.order, self.len, self.active) = (Vec::new(), Vec::new(), 0, 0);
            return Ok(());
        }
        let capacity = match self.layers.iter().flatten().next() {
            Some((k, _)) => k.dim(2)?,
            None => self.initial_capacity,
        };
        *self = self.gather(keep, capacity)?;
        self.active = active;
        Ok(())
    }

    /// Every row active again, in the order they had before any was set
    /// aside.
    pub fn activate_all(&mut self) -> Result<()> {
        for slot in 0..self.rows.len() {
            while self.order[slot] != slot {
                let home = self.order[slot];
                self.swap_rows(slot, home)?;
            }
        }
        self.active = self.rows.len();
        Ok(())
    }

    fn swap_rows(&mut self, a: usize, b: usize) -> Result<()> {
        if a == b {
            return Ok(());
        }
        for (k, v) in self.layers.iter().flatten() {
            for x in [k, v] {
                // `force_contiguous` copies the row alone; `copy` would
                // clone the whole cache buffer behind the view (twice per
                // layer for every row that finished: 6% of a 1.5B
                // rollout's time in a profile).
                let row = |r: usize| x.narrow(0, r, 1)?.force_contiguous();
                let (row_a, row_b) = (row(a)?, row(b)?);
                x.slice_set(&row_b, 0, a)?;
                x.slice_set(&row_a, 0, b)?;
            }
        }
        self.rows.swap(a, b);
        self.order.swap(a, b);
        Ok(())
    }

    /// A freshly gathered `[b, h, len, d]` tensor in a buffer of
    /// `capacity` columns (when that is more than `len`).
    fn with_capacity(&self, x: Tensor, capacity: usize) -> Result<Tensor> {
        if self.storage == Storage::Differentiable || capacity <= self.len {
            return Ok(x);
        }
        let buffer = Tensor::zeros(
            (x.dim(0)?, self.kv_heads, capacity, self.head_dim),
            x.dtype(),
            x.device(),
        )?;
        buffer.slice_set(&x.contiguous()?, 2, 0)?;
        Ok(buffer)
    }
}
