//! The machine a benchmark ran on and its limits, printed with the numbers
//! because machines differ threefold from one session to the next.

use r3_kernels::CpuLevel;
use serde_json::{json, Value};

/// The machine's limits, measured on the CPU before the work they judge.
pub struct Limits {
    pub gemm_gflops: f64,
    pub read_gb_per_s: f64,
}

impl Limits {
    /// Measures both, `seconds` each: a 1024³ product through r3's gemm
    /// entry on every thread, and a 512 MiB read. `None` when `seconds` is
    /// 0 or the work runs on a GPU (these are the CPU's limits).
    pub fn measure(seconds: f64, on_cpu: bool) -> Option<Self> {
        if seconds <= 0.0 || !on_cpu {
            return None;
        }
        let threads = candle_core::utils::get_num_threads();
        Some(Self {
            gemm_gflops: r3_kernels::machine::gemm_gflops(1024, seconds, threads),
            read_gb_per_s: r3_kernels::machine::read_gb_per_s(512 << 20, seconds),
        })
    }
}

/// `amount / seconds` as a fraction of `limit` (per second, in units of
/// 10⁹), when the limit was measured.
pub fn fraction(amount: f64, seconds: f64, limit: Option<f64>) -> Option<f64> {
    limit
        .filter(|_| seconds > 0.0)
        .map(|limit| amount / seconds / (limit * 1e9))
}

/// Peak resident memory of this process so far, from /proc.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The CPU's name, the vector levels it has, the one r3's kernels used
/// (`R3_CPU` may lower it), and the limits when measured.
pub fn describe(limits: Option<&Limits>) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let flags = field("flags").unwrap_or_default();
    let wanted = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx512vbmi",
        "avx512_bf16",
        "avx512_fp16",
    ];
    let features: Vec<&str> = wanted
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    json!({
        "cpu": field("model name"),
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "features": features,
        "kernel_level": CpuLevel::current().name(),
        "detected_level": CpuLevel::detected().name(),
        "gemm_gflops": limits.map(|l| l.gemm_gflops),
        "read_gb_per_s": limits.map(|l| l.read_gb_per_s),
    })
}
