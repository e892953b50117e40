//! The threads work runs on, and sums over them that come out the same
//! on every run. A rayon operation started from a thread
//! outside the pool hands its work to the pool and sleeps until it is done,
//! and the pool's threads sleep between operations: two wake-ups per
//! operation, hundreds of operations per decode step. Started from one of
//! the pool's own threads, the operation splits its work with that thread.

use rayon::iter::{IndexedParallelIterator, ParallelIterator};

/// Runs `work` on a thread of a new rayon pool (as many threads as rayon's
/// default), so that every parallel operation inside it is started from a
/// pool thread. Measured with `r3` run this way: default model batch-1
/// decode 87–89 → 121–131 tokens/s, batch 32 355–383 → 397–402;
/// Qwen2.5-Coder-1.5B batch 1 65–77 → 61–62 ms a step. The threads get a
/// main thread's stack or more (autograd walks its graph recursively).
pub fn run_in_pool<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    match rayon::ThreadPoolBuilder::new().stack_size(16 << 20).build() {
        Ok(pool) => pool.install(work),
        // Threads refused: the work runs here, on the global pool.
        Err(_) => work(),
    }
}

/// `items` folded in parallel into one result, the same to the last bit on
/// every run with the same thread count: the items are cut into one
/// contiguous run per thread, each folded in order, and the runs merged
/// left to right. rayon's own `fold` cuts where threads happen to steal,
/// so float sums over it (a norm's weight gradient, a packed product's
/// partial outputs) changed from run to run, and a resumed run could not
/// match an uninterrupted one byte for byte.
pub fn fold_in_order<P, T>(
    items: P,
    init: impl Fn() -> T + Sync + Send,
    fold: impl Fn(T, P::Item) -> T + Sync + Send,
    merge: impl Fn(T, T) -> T,
) -> T
where
    P: IndexedParallelIterator,
    T: Send,
{
    let run = items.len().div_ceil(rayon::current_num_threads()).max(1);
    let runs: Vec<T> = items.fold_chunks(run, &init, fold).collect();
    runs.into_iter().reduce(merge).unwrap_or_else(init)
}

/// `a + b`, element by element, in `a`: the merge of per-thread partial
/// sums of equal length.
pub fn add_vectors(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn a_fold_in_order_is_the_sequential_fold_of_one_run_per_thread() {
        // Magnitudes far apart, so that any other grouping of the additions
        // rounds differently.
        let values: Vec<f32> = (0..10_007i32)
            .map(|i| ((i * 7919) % 1000) as f32 * 10f32.powi(i % 9 - 4))
            .collect();
        for threads in [1, 2, 3, 5] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let run = values.len().div_ceil(threads);
            let expected = values
                .chunks(run)
                .map(|c| c.iter().fold(0f32, |a, b| a + b))
                .fold(0f32, |a, b| a + b);
            for _ in 0..50 {
                let got = pool.install(|| {
                    fold_in_order(values.par_iter(), || 0f32, |a, b| a + b, |a, b| a + b)
                });
                assert_eq!(got.to_bits(), expected.to_bits(), "{threads} threads");
            }
        }
    }
}
