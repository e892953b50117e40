//! The in-place AdamW step matches the textbook update, including bias
//! correction, decoupled weight decay (matrices only) and gradient scaling.

use candle_core::{Device, Tensor, Var};
use r3_train::optim::{clip_scale, AdamW};

#[test]
fn adamw_matches_the_textbook_update() {
    let (beta1, beta2, eps, decay, lr, scale) = (0.9, 0.99, 1e-8, 0.1, 0.05, 0.5);
    let start = [[0.5f32, -1.0], [2.0, 0.25]];
    let matrix = Var::from_tensor(&Tensor::new(&start, &Device::Cpu).unwrap()).unwrap();
    let vector = Var::from_tensor(&Tensor::new(&[1.0f32, -3.0], &Device::Cpu).unwrap()).unwrap();
    let mut adam = AdamW::new(
        vec![("w".into(), matrix.clone()), ("b".into(), vector.clone())],
        beta1,
        beta2,
        eps,
        decay,
    )
    .unwrap();
    let grads = |step: usize| -> [Vec<f32>; 2] {
        let s = step as f32;
        [vec![0.3 * s, -0.2, 1.5 - s, 0.01], vec![-0.7, 0.4 * s]]
    };

    // By hand, in f64: p ← p(1 − lr·λ) − lr·m̂/(√v̂ + ε), λ = 0 for vectors.
    let mut expected: [Vec<f64>; 2] = [
        start.iter().flatten().map(|&x| x as f64).collect(),
        vec![1.0, -3.0],
    ];
    let mut m = [vec![0f64; 4], vec![0f64; 2]];
    let mut v = [vec![0f64; 4], vec![0f64; 2]];
    for step in 1..=3 {
        let g = grads(step);
        let tensors = [
            Tensor::from_vec(g[0].clone(), (2, 2), &Device::Cpu).unwrap(),
            Tensor::from_vec(g[1].clone(), 2, &Device::Cpu).unwrap(),
        ];
        adam.update(&tensors, lr, scale).unwrap();
        for p in 0..2 {
            let wd = if p == 0 { decay } else { 0.0 };
            for i in 0..expected[p].len() {
                let gi = g[p][i] as f64 * scale;
                m[p][i] = beta1 * m[p][i] + (1.0 - beta1) * gi;
                v[p][i] = beta2 * v[p][i] + (1.0 - beta2) * gi * gi;
                let m_hat = m[p][i] / (1.0 - beta1.powi(step as i32));
                let v_hat = v[p][i] / (1.0 - beta2.powi(step as i32));
                expected[p][i] =
                    expected[p][i] * (1.0 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps);
            }
        }
    }
    let got = [
        matrix
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vector.as_tensor().to_vec1::<f32>().unwrap(),
    ];
    for p in 0..2 {
        for (a, b) in got[p].iter().zip(&expected[p]) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}

#[test]
fn clipping_scales_only_norms_above_the_bound() {
    assert_eq!(clip_scale(0.5, 1.0), 1.0);
    assert_eq!(clip_scale(5.0, 0.0), 1.0);
    assert!((clip_scale(4.0, 1.0) - 0.25).abs() < 1e-6);
}
