//! The vector level r3's kernels run at, and loops compiled for it.

/// The widest vector instructions r3's own kernels use (packed products,
/// decode attention, exponentials). Detected once; `R3_CPU` may lower it,
/// so that a machine with AVX-512 also runs, and tests, the AVX2 and
/// portable paths that most laptops take. (gemm and candle's own ops pick
/// their instructions themselves.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuLevel {
    /// Plain Rust, whatever the target's baseline vectorizes to.
    Portable,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512F.
    Avx512,
}

/// The environment variable that lowers [`CpuLevel::current`].
pub const CPU_LEVEL_VAR: &str = "R3_CPU";

impl CpuLevel {
    /// Every level, lowest first.
    pub const ALL: [CpuLevel; 3] = [Self::Portable, Self::Avx2, Self::Avx512];

    /// The name `R3_CPU` takes and benchmarks print.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// The widest level this CPU runs.
    pub fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// The levels this CPU runs, lowest first: what tests compare.
    pub fn available() -> Vec<Self> {
        let top = Self::detected();
        Self::ALL.into_iter().filter(|l| *l <= top).collect()
    }

    /// The level `R3_CPU` asks for (the detected one when unset), or why it
    /// cannot be had.
    pub fn from_env() -> Result<Self, String> {
        let detected = Self::detected();
        let Ok(value) = std::env::var(CPU_LEVEL_VAR) else {
            return Ok(detected);
        };
        let wanted = Self::ALL
            .into_iter()
            .find(|l| l.name() == value.trim())
            .ok_or_else(|| {
                format!("{CPU_LEVEL_VAR}={value:?}: expected avx512, avx2 or portable")
            })?;
        if wanted > detected {
            return Err(format!(
                "{CPU_LEVEL_VAR}={value}: this CPU's widest level is {}",
                detected.name()
            ));
        }
        Ok(wanted)
    }

    /// The level kernels run at: [`CpuLevel::from_env`], decided once. An
    /// unusable `R3_CPU` is reported on stderr and the detected level used
    /// (the `r3` binary refuses it before any work instead).
    pub fn current() -> Self {
        static LEVEL: std::sync::OnceLock<CpuLevel> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            Self::from_env().unwrap_or_else(|message| {
                eprintln!("warning: {message}; using {}", Self::detected().name());
                Self::detected()
            })
        })
    }
}

/// Runs `$body` compiled for AVX-512 or AVX2 + FMA when
/// [`CpuLevel::current`] allows them, so that the loops it inlines (written
/// for the compiler to vectorize) become wide vector code; as is otherwise.
/// Without `-ffast-math` the compiler neither reorders sums nor fuses
/// multiply-adds, so every level computes the same values.
macro_rules! with_vector_features {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512<T>(body: impl FnOnce() -> T) -> T {
                body()
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<T>(body: impl FnOnce() -> T) -> T {
                body()
            }
            match $crate::level::CpuLevel::current() {
                // SAFETY: the level is at most what the CPU supports.
                $crate::level::CpuLevel::Avx512 => unsafe { avx512(|| $body) },
                // SAFETY: as above.
                $crate::level::CpuLevel::Avx2 => unsafe { avx2(|| $body) },
                $crate::level::CpuLevel::Portable => $body,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}
pub(crate) use with_vector_features;

#[cfg(test)]
mod tests {
    use super::*;

    /// `.ci/run` runs the kernel tests once per level through `R3_CPU`;
    /// this fails if the variable stopped reaching the kernels.
    #[test]
    fn kernels_run_at_the_level_r3_cpu_asks_for() {
        let expected = match std::env::var(CPU_LEVEL_VAR) {
            Ok(name) => name,
            Err(_) => CpuLevel::detected().name().to_string(),
        };
        assert_eq!(CpuLevel::current().name(), expected);
        assert!(CpuLevel::available().contains(&CpuLevel::current()));
        assert_eq!(CpuLevel::available()[0], CpuLevel::Portable);
    }
}
