//! Projections and how a decoder holds them: transposed and fused f32
//! (trainable), packed in the file's encoding (inference), or transposed
//! views (a model that only scores); decided once, at load.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use r3_kernels::device_matmul::device_matmul;
use r3_kernels::matmul::Activations;
use r3_kernels::matmul::{matmul, packed_matmul_with};
use r3_kernels::packed::PackedMatrix;

use crate::error::Result;
use crate::weights::Weights;

/// How a decoder holds its projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WeightLayout {
    /// Packed in the file's encoding where a kernel reads it, fast
    /// otherwise: for generation.
    Packed,
    /// Transposed, fused f32 copies of the loaded weights: trainable.
    Fast,
    /// Packed where a kernel reads it, transposed views of the loaded
    /// weights otherwise: the least memory, for a model that only scores.
    Compact,
}

/// A projection's weight.
#[derive(Debug, Clone)]
pub(super) enum ProjectionWeight {
    /// `[in, Σ out]` in f32: trainable.
    Dense(Tensor),
    /// One `[out_i, in]` matrix per part, in its file's encoding: inference
    /// only.
    Packed(Arc<[PackedMatrix]>),
}

/// A LoRA update of one projection part, `scale · (x · Aᵀ) · Bᵀ`, with
/// `A` `[r, in]` and `B` `[out, r]` in PEFT's layout (see `lora.rs`).
#[derive(Debug, Clone)]
pub(super) struct LoraPair {
    pub(super) a: Tensor,
    pub(super) b: Tensor,
    pub(super) scale: f64,
}

/// The projections that read one input (q/k/v, gate/up): one fused
/// product, or one product per part (a compact model's transposed views).
/// An enum, so that which one a layer holds is a type, not a length.
#[derive(Debug, Clone)]
pub(super) enum Projections<const N: usize> {
    Fused(Linear),
    Split([Linear; N]),
}

impl<const N: usize> Projections<N> {
    /// The `N` parts of one input of width `inp` (see [`Linear::load`]).
    pub(super) fn load(
        w: &Weights,
        parts: &[(String, usize); N],
        inp: usize,
        bias: bool,
        layout: WeightLayout,
    ) -> Result<Self> {
        let mut linears = Linear::load(w, parts, inp, bias, layout)?;
        Ok(match linears.len() {
            1 => Self::Fused(linears.remove(0)),
            _ => Self::Split(
                linears
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("Linear::load gives one or N projections")),
            ),
        })
    }

    pub(super) fn as_slice(&self) -> &[Linear] {
        match self {
            Self::Fused(linear) => std::slice::from_ref(linear),
            Self::Split(linears) => linears,
        }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [Linear] {
        match self {
            Self::Fused(linear) => std::slice::from_mut(linear),
            Self::Split(linears) => linears,
        }
    }
}

/// Projections of one input, `x · W (+ b)` with `W` `[in, Σ out]`,
/// flattening the batch first so that one GEMM serves every row (a
/// broadcast batched matmul would re-read the weights once per row).
#[derive(Debug, Clone)]
pub(super) struct Linear {
    pub(super) weight: ProjectionWeight,
    pub(super) bias: Option<Tensor>,
    /// HF name (without `.weight`) and output width of each part, in
    /// column order.
    pub(super) parts: Vec<(String, usize)>,
    /// Each part's LoRA update, if any (a fused q/k/v projection has one
    /// adapter per HF projection, as PEFT has).
    pub(super) adapters: Vec<Option<LoraPair>>,
    /// The same adapters as two products, for a model that generates
    /// ([`Linear::stack_adapters`]); `None` where gradients may flow.
    pub(super) stacked: Option<StackedAdapters>,
    /// How a packed weight's decode products take their inputs: rounded
    /// to 8 bits in a model that only samples (`Llama::with_activations`).
    pub(super) activations: Activations,
}

/// Every adapter of a projection as two products, `(x · Aᵀ) · Bᵀ`: the
/// parts' A stacked (`Aᵀ` `[in, Σ r]`) and their scaled B block-diagonal
/// (`Bᵀ` `[Σ r, Σ out]`). A decode step pays the adapters per operation,
/// not per FLOP (the 1.5B's adapters added 10–30% to a step for 1.4% of
/// its FLOPs, as two products per adapter, a concatenation and an add):
/// two products and an add per projection, for a few FLOPs more (B's
/// zero blocks).
#[derive(Debug, Clone)]
pub(super) struct StackedAdapters {
    a_t: Tensor,
    b_t: Tensor,
}

impl Linear {
    /// The parts `(HF name, out)` of an input of width `inp`: packed, unless
    /// training or a part's encoding has no packed kernel; else fused into
    /// one contiguous copy (fast), or one transposed view each (compact).
    pub(super) fn load(
        w: &Weights,
        parts: &[(String, usize)],
        inp: usize,
        bias: bool,
        layout: WeightLayout,
    ) -> Result<Vec<Self>> {
        let load_bias = || -> Result<Option<Tensor>> {
            if !bias {
                return Ok(None);
            }
            let biases = parts
                .iter()
                .map(|(name, out)| w.get(&format!("{name}.bias"), &[*out]))
                .collect::<Result<Vec<_>>>()?;
            Ok(Some(Tensor::cat(&biases, 0)?))
        };
        if layout != WeightLayout::Fast {
            let packed = parts
                .iter()
                .map(|(name, out)| w.packed(&format!("{name}.weight"), &[*out, inp]))
                .collect::<Result<Option<Vec<_>>>>()?;
            if let Some(packed) = packed {
                return Ok(vec![Self {
                    weight: ProjectionWeight::Packed(packed.into()),
                    bias: load_bias()?,
                    parts: parts.to_vec(),
                    adapters: vec![None; parts.len()],
                    stacked: None,
                    activations: Activations::EXACT,
                }]);
            }
        }
        let load_one = |(name, out): &(String, usize)| -> Result<(Tensor, Option<Tensor>)> {
            let weight = w.get(&format!("{name}.weight"), &[*out, inp])?;
            let b = match bias {
                true => Some(w.get(&format!("{name}.bias"), &[*out])?),
                false => None,
            };
            Ok((weight, b))
        };
        let loaded = parts.iter().map(load_one).collect::<Result<Vec<_>>>()?;
        if layout == WeightLayout::Compact {
            return parts
                .iter()
                .zip(loaded)
                .map(|(part, (weight, bias))| {
                    Ok(Self {
                        weight: ProjectionWeight::Dense(weight.t()?),
                        bias,
                        parts: vec![part.clone()],
                        adapters: vec![None],
                        stacked: None,
                        activations: Activations::EXACT,
                    })
                })
                .collect();
        }
        let transposed = loaded
            .iter()
            .map(|(weight, _)| weight.t())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(vec![Self {
            weight: ProjectionWeight::Dense(Tensor::cat(&transposed, 1)?.contiguous()?),
            bias: load_bias()?,
            parts: parts.to_vec(),
            adapters: vec![None; parts.len()],
            stacked: None,
            activations: Activations::EXACT,
        }])
    }

    /// The parameter name: the first part's HF name, then the last path
    /// component of each other part (`…q_proj+k_proj+v_proj`).
    pub(super) fn name(&self) -> String {
        let mut name = self.parts[0].0.clone();
        for (part, _) in &self.parts[1..] {
            name.push('+');
            name.push_str(part.rsplit('.').next().unwrap_or(part));
        }
        name
    }

    /// The input width.
    pub(super) fn input_width(&self) -> usize {
        match &self.weight {
            ProjectionWeight::Dense(weight_t) => weight_t.dims()[0],
            ProjectionWeight::Packed(parts) => parts[0].cols(),
        }
    }

    /// The parts' outputs side by side, `[b, t, Σ out_i]`, in `x`'s type.
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, inp) = x.dims3()?;
        let rows = x.reshape((b * t, inp))?;
        let mut y = match &self.weight {
            ProjectionWeight::Dense(weight_t) => matmul(&rows, &cast_like(weight_t, &rows)?)?,
            ProjectionWeight::Packed(parts) => packed_matmul_with(&rows, parts, self.activations)?,
        };
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(&cast_like(bias, &y)?)?;
        }
        if let Some(stacked) = &self.stacked {
            let down = matmul(&rows, &cast_like(&stacked.a_t, &rows)?)?;
            y = (y + matmul(&down, &cast_like(&stacked.b_t, &rows)?)?)?;
        } else if self.adapters.iter().any(Option::is_some) {
            y = (y + self.lora_updates(&rows)?)?;
        }
        y.reshape((b, t, ()))
    }

    /// Sets [`Linear::stacked`] from the adapters as they are now (none
    /// without adapters). For a snapshot that generates: the stacked
    /// copies carry no gradient and do not follow later updates.
    pub(super) fn stack_adapters(&mut self) -> candle_core::Result<()> {
        let present: Vec<(usize, &LoraPair)> = self
            .parts
            .iter()
            .scan(0, |offset, (_, out)| {
                *offset += out;
                Some(*offset - out)
            })
            .zip(&self.adapters)
            .filter_map(|(offset, adapter)| adapter.as_ref().map(|l| (offset, l)))
            .collect();
        let Some((_, first)) = present.first() else {
            self.stacked = None;
            return Ok(());
        };
        let device = first.a.device().clone();
        let a: Vec<Tensor> = present.iter().map(|(_, l)| l.a.detach()).collect();
        let a_t = Tensor::cat(&a, 0)?
            .to_dtype(DType::F32)?
            .t()?
            .contiguous()?;
        let ranks = a_t.dim(1)?;
        let outs: usize = self.parts.iter().map(|(_, out)| out).sum();
        let mut b_t = vec![0f32; ranks * outs];
        let mut rank0 = 0;
        for (out0, l) in &present {
            let b = (l.b.detach().to_dtype(DType::F32)? * l.scale)?.to_vec2::<f32>()?;
            let rank = l.a.dim(0)?;
            for (o, row) in b.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    b_t[(rank0 + j) * outs + out0 + o] = v;
                }
            }
            rank0 += rank;
        }
        self.stacked = Some(StackedAdapters {
            a_t,
            b_t: Tensor::from_vec(b_t, (ranks, outs), &device)?,
        });
        Ok(())
    }

    /// Every part's LoRA update side by side `[rows, Σ out]` (zeros for a
    /// part without an adapter).
    fn lora_updates(&self, rows: &Tensor) -> candle_core::Result<Tensor> {
        let updates = self
            .parts
            .iter()
            .zip(&self.adapters)
            .map(|((_, out), adapter)| match adapter {
                Some(l) => {
                    // The scale goes into B (`[out, r]`), not onto the
                    // `[rows, out]` update: one pass fewer each way.
                    let a = cast_like(&l.a, rows)?;
                    let b = (cast_like(&l.b, rows)? * l.scale)?;
                    device_matmul(&device_matmul(rows, &a.t()?)?, &b.t()?)
                }
                None => Tensor::zeros((rows.dim(0)?, *out), rows.dtype(), rows.device()),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&updates, 1)
    }

    /// Each part's weight (and bias) back in HF's layout and names.
    pub(super) fn hf_weights(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        let mut offset = 0;
        for (i, (name, width)) in self.parts.iter().enumerate() {
            let weight = match &self.weight {
                ProjectionWeight::Dense(weight_t) => {
                    weight_t.narrow(1, offset, *width)?.t()?.contiguous()?
                }
                ProjectionWeight::Packed(parts) => parts[i].to_f32()?,
            };
            out.insert(format!("{name}.weight"), weight);
            if let Some(bias) = &self.bias {
                out.insert(
                    format!("{name}.bias"),
                    bias.narrow(0, offset, *width)?.contiguous()?,
                );
            }
            offset += width;
        }
        Ok(())
    }
}

/// `weight` in `input`'s type: a decoder computing in bf16 over f32 master
/// weights (mixed-precision training) casts each weight where it is used,
/// and autograd carries the gradient back to the f32 weight. A no-op when
/// the types agree.
pub(super) fn cast_like(weight: &Tensor, input: &Tensor) -> candle_core::Result<Tensor> {
    weight.to_dtype(input.dtype())
}

/// The output of every part of `linears`, in order, as `[b, t, out_i]`
/// views of the fused products (no copies).
pub(super) fn project_all(linears: &[Linear], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
    let mut outputs = Vec::with_capacity(3);
    for linear in linears {
        let y = linear.forward(x)?;
        let mut offset = 0;
        for (_, width) in &linear.parts {
            outputs.push(y.narrow(2, offset, *width)?);
            offset += width;
        }
    }
    Ok(outputs)
}

/// The output of every part of `linears`, in order, on the forward's grid
/// and split into heads of `head_dim`: `[b, heads_i, t, head_dim]`,
/// contiguous. Each part is one copy out of the fused product.
pub(super) fn project_heads(
    linears: &[Linear],
    x: &Tensor,
    head_dim: usize,
    inputs: &super::ForwardInputs,
) -> candle_core::Result<Vec<Tensor>> {
    let mut outputs = Vec::with_capacity(3);
    for linear in linears {
        let y = inputs.to_grid(linear.forward(x)?)?;
        let (b, t, total) = y.dims3()?;
        let heads = y.reshape((b, t, total / head_dim, head_dim))?;
        let mut offset = 0;
        for (_, width) in &linear.parts {
            let part = heads.narrow(2, offset / head_dim, width / head_dim)?;
            outputs.push(part.transpose(1, 2)?.contiguous()?);
            offset += width;
        }
    }
    Ok(outputs)
}
