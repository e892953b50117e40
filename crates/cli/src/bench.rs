//! `r3 bench`: speed and memory, printed as one JSON object; flags become
//! a bench of the r3-bench crate, which does the work.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use r3_kernels::matmul::Activations;
use r3_train::config::TrainConfig;
use std::io::Write;

use crate::{DecodeArgs, ModelArgs};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode throughput of batched generation
    Generate(GenerateBench),
    /// Weights per second of the packed products per encoding, the matrix
    /// in cache and streamed: whether decoding is bound by memory or by
    /// the kernels
    Kernels(KernelsBench),
    /// Verdicts per second of the verifiers
    Verify(VerifyBench),
    /// Seconds per GRPO step, split by phase, and peak memory
    Train(TrainBench),
}

#[derive(Args)]
pub struct TrainBench {
    #[command(flatten)]
    model: ModelArgs,
    /// A model of this shape (an HF config.json, e.g. configs/Qwen2.5-1.5B.json)
    /// with random weights, and the tokenizer of --model (default: the default model's)
    #[arg(long, conflicts_with = "adapter")]
    random_init: Option<std::path::PathBuf>,
    /// Failures per step (B)
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Reflections per failure (G)
    #[arg(long, default_value_t = 8)]
    group: usize,
    #[arg(long, default_value_t = 128)]
    max_reflection_tokens: usize,
    #[arg(long, default_value_t = 128)]
    max_retry_tokens: usize,
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Reflections per forward/backward pass (the trainer's default)
    #[arg(long, default_value_t = 8)]
    micro_batch_size: usize,
    /// Which tokens carry the loss (the config's `train_on`): reflection,
    /// or retry (the ablation crediting the retry's tokens)
    #[arg(long, default_value = "reflection")]
    train_on: String,
    /// Keep every activation instead of recomputing them in the backward
    #[arg(long)]
    no_gradient_checkpointing: bool,
    /// The packed base's products of many rows in bf16 with f32 sums,
    /// where the CPU has AVX512_BF16 (the config's `bf16_products`)
    #[arg(long)]
    bf16_products: bool,
    /// Seconds spent measuring the machine's GEMM rate before the work;
    /// 0 skips it
    #[arg(long, default_value_t = 1.0)]
    limit_seconds: f64,
    #[command(flatten)]
    lora: crate::train::LoraArgs,
}

#[derive(Args)]
pub struct KernelsBench {
    /// Input rows of each product (1: decoding at batch 1)
    #[arg(long, default_value_t = 1)]
    rows: usize,
    /// Seconds per encoding and placement
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// MiB the streamed copies of each matrix add up to (far beyond the
    /// L3, so that they are read from memory)
    #[arg(long, default_value_t = 384)]
    streamed_mib: usize,
    /// Seconds spent measuring the machine's read rate first; 0 skips it
    #[arg(long, default_value_t = 1.0)]
    limit_seconds: f64,
    /// Round the inputs to 8 bits a block of 32 where the encoding has an
    /// integer kernel (as `--int8-decode` does for generation)
    #[arg(long)]
    int8: bool,
    /// Products past the register kernels' rows in bf16 with f32 sums,
    /// where the CPU has AVX512_BF16 (as training's `bf16_products`)
    #[arg(long, conflicts_with = "int8")]
    bf16: bool,
}

#[derive(Args)]
pub struct VerifyBench {
    /// Function-calling records to judge
    #[arg(long, default_value = "data/function_calling.jsonl")]
    data: std::path::PathBuf,
    /// Also time an external verifier command (JSON lines, see README)
    #[arg(long)]
    verifier: Option<String>,
    /// Seconds to spend on each verifier
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
}

#[derive(Args)]
pub struct GenerateBench {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    decode: DecodeArgs,
    /// A model of this shape (an HF config.json, e.g. configs/Qwen2.5-1.5B.json)
    /// with random weights, and the tokenizer of --model (default: the default model's)
    #[arg(long, conflicts_with_all = ["adapter", "int8_decode", "bf16_products"])]
    random_init: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Length of the synthetic prompt of every row
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens decoded per row (end-of-sequence is ignored, so every row
    /// decodes exactly this many)
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    #[arg(long, default_value_t = 0.9)]
    temperature: f64,
    /// Expand every weight to f32 instead of keeping packed encodings: the
    /// baseline the packed kernels are measured against
    #[arg(long, conflicts_with_all = ["int8_decode", "bf16_products"])]
    f32: bool,
    /// Seconds spent measuring each of the machine's limits (GEMM rate,
    /// memory read rate) before the work; 0 skips them
    #[arg(long, default_value_t = 1.0)]
    limit_seconds: f64,
}

pub fn run(command: BenchCommand) -> Result<()> {
    let report = match command {
        BenchCommand::Generate(args) => r3_bench::generate::run(&args.bench())?,
        BenchCommand::Kernels(args) => r3_bench::kernels::run(&args.bench())?,
        BenchCommand::Verify(args) => r3_bench::verify::run(&args.bench())?,
        BenchCommand::Train(args) => r3_bench::train::run(&args.bench()?)?,
    };
    writeln!(std::io::stdout(), "{report}")?;
    Ok(())
}

impl GenerateBench {
    fn bench(self) -> r3_bench::generate::GenerateBench {
        r3_bench::generate::GenerateBench {
            model: self.model.sampling_spec(self.decode),
            random_init: self.random_init,
            batch: self.batch,
            prompt_tokens: self.prompt_tokens,
            new_tokens: self.new_tokens,
            temperature: self.temperature,
            f32: self.f32,
            limit_seconds: self.limit_seconds,
            release_memory: crate::release_freed_memory,
        }
    }
}

impl KernelsBench {
    fn bench(self) -> r3_bench::kernels::KernelsBench {
        r3_bench::kernels::KernelsBench {
            rows: self.rows,
            seconds: self.seconds,
            streamed_bytes: self.streamed_mib << 20,
            limit_seconds: self.limit_seconds,
            activations: Activations {
                int8_decode: self.int8,
                bf16_products: self.bf16,
            },
        }
    }
}

impl VerifyBench {
    fn bench(self) -> r3_bench::verify::VerifyBench {
        r3_bench::verify::VerifyBench {
            data: self.data,
            verifier: self.verifier,
            seconds: self.seconds,
        }
    }
}

impl TrainBench {
    /// The trainer's own config for these flags, checked.
    fn bench(self) -> Result<r3_bench::train::TrainBench> {
        if self.batch == 0 || self.group < 2 || self.steps == 0 {
            bail!("need --batch ≥ 1, --group ≥ 2 and --steps ≥ 1");
        }
        let mut overrides = self.lora.overrides();
        overrides.push(format!("train_on={:?}", self.train_on));
        let loaded = TrainConfig::load(None, &overrides)?;
        let config = TrainConfig {
            use_peft: loaded.use_peft,
            lora_r: loaded.lora_r,
            lora_alpha: loaded.lora_alpha,
            lora_target_modules: loaded.lora_target_modules,
            train_on: loaded.train_on,
            output_dir: std::env::temp_dir().join(format!("r3-bench-train-{}", std::process::id())),
            max_steps: self.steps,
            failures_per_step: self.batch,
            num_generations: self.group,
            max_completion_length: self.max_reflection_tokens,
            retry_max_tokens: self.max_retry_tokens,
            retry_temperature: 0.9,
            micro_batch_size: self.micro_batch_size,
            gradient_checkpointing: !self.no_gradient_checkpointing,
            bf16_products: self.bf16_products,
            device: self.model.device,
            dtype: self.model.dtype,
            save_steps: 0,
            ..Default::default()
        };
        config.validate()?;
        Ok(r3_bench::train::TrainBench {
            model: self.model.spec(),
            random_init: self.random_init,
            config,
            limit_seconds: self.limit_seconds,
            release_memory: crate::release_freed_memory,
        })
    }
}
