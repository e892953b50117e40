//! Models by their Hugging Face id (`Qwen/Qwen2.5-1.5B-Instruct`,
//! `org/name@revision`, `org/name:file.gguf` for one file of a GGUF
//! repository), found where transformers, `huggingface-cli` and vLLM keep
//! them: the shared hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; refs, snapshots, blobs), read through the
//! `hf-hub` crate. A model already there is used as it is; otherwise it is
//! downloaded into the same cache unless `HF_HUB_OFFLINE` is set
//! (`HF_TOKEN` authenticates).

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::{FetchError, Result};

/// A model's hub id, revision and, for a GGUF repository, the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
    pub file: Option<String>,
}

impl HubId {
    /// `org/name[@revision][:file]`, or `None` for anything else (a path).
    pub fn parse(text: &str) -> Option<Self> {
        let (rest, file) = match text.split_once(':') {
            Some((rest, file)) if !file.is_empty() && !file.contains('/') => {
                (rest, Some(file.to_string()))
            }
            Some(_) => return None,
            None => (text, None),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, rev.to_string()),
            Some(_) => return None,
            None => (rest, "main".to_string()),
        };
        let mut parts = repo.split('/');
        let (org, name) = (parts.next()?, parts.next()?);
        let word = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        (parts.next().is_none() && word(org) && word(name)).then(|| Self {
            repo: repo.to_string(),
            revision,
            file,
        })
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.repo)?;
        if self.revision != "main" {
            write!(f, "@{}", self.revision)?;
        }
        if let Some(file) = &self.file {
            write!(f, ":{file}")?;
        }
        Ok(())
    }
}

/// The shared hub cache: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or
/// `~/.cache/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/huggingface/hub")
}

/// Whether `HF_HUB_OFFLINE` forbids downloads (`1`, `true`, `yes`, `on`).
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// The files of an HF model directory that r3 reads, given the names of
/// those already known: the weights as one file or as shards listed in an
/// index.
fn needed_files(index: Option<&Path>) -> Result<Vec<String>> {
    let mut files: Vec<String> = ["config.json", "tokenizer.json", "tokenizer_config.json"]
        .map(String::from)
        .to_vec();
    match index {
        Some(index) => {
            let text = std::fs::read_to_string(index).map_err(|e| crate::io(index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| FetchError::Invalid {
                    path: index.to_path_buf(),
                    message: e.to_string(),
                })?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|f| f.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            files.push("model.safetensors.index.json".into());
            files.extend(shards);
        }
        None => files.push("model.safetensors".into()),
    }
    Ok(files)
}

/// The local path of `id`: the snapshot directory of an HF model (every
/// file r3 reads present), or the GGUF file named. Taken from the cache
/// when there; else downloaded into it, unless offline. A model that cannot
/// be had is an error naming the id, the cache searched and how to fetch it.
pub fn resolve(id: &HubId) -> Result<PathBuf> {
    let cache = Cache::new(cache_dir());
    let repo = Repo::with_revision(id.repo.clone(), RepoType::Model, id.revision.clone());
    let cached = cache.repo(repo.clone());
    // A revision given as a commit is a snapshot's name, with no ref.
    let in_cache = |file: &str| {
        cached.get(file).or_else(|| {
            let snapshot = cache
                .path()
                .join(format!("models--{}", id.repo.replace('/', "--")))
                .join("snapshots")
                .join(&id.revision)
                .join(file);
            snapshot.exists().then_some(snapshot)
        })
    };
    let wanted = match &id.file {
        Some(file) => vec![file.clone()],
        None => match in_cache("model.safetensors.index.json") {
            Some(index) => needed_files(Some(&index))?,
            None => needed_files(None)?,
        },
    };
    let missing: Vec<&String> = wanted.iter().filter(|f| in_cache(f).is_none()).collect();
    if missing.is_empty() {
        let first = in_cache(&wanted[0]).expect("present");
        return Ok(match &id.file {
            Some(_) => first,
            None => first.parent().expect("a snapshot directory").to_path_buf(),
        });
    }
    let how =
        format!(
        "fetch it with `huggingface-cli download {}{}`{}, or pass a local directory or GGUF file",
        id.repo,
        id.file.as_deref().map(|f| format!(" {f}")).unwrap_or_default(),
        if id.revision == "main" {
            String::new()
        } else {
            format!(" --revision {}", id.revision)
        }
    );
    let not_cached = |why: String| {
        FetchError::Pip(format!(
            "model '{id}': {why} in the HF cache {} (missing: {}); {how}",
            cache.path().display(),
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    };
    if offline() {
        return Err(not_cached(
            "HF_HUB_OFFLINE is set and it is not complete".into(),
        ));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_token(std::env::var("HF_TOKEN").ok())
        .with_progress(false)
        .build()
        .map_err(|e| {
            not_cached(format!(
                "cannot reach the hub ({e}), and it is not complete"
            ))
        })?;
    let remote = api.repo(repo);
    let download = |file: &str| {
        remote.get(file).map_err(|e| {
            not_cached(format!(
                "downloading {file} failed ({e}); it is not complete"
            ))
        })
    };
    let first = download(&wanted[0])?;
    if id.file.is_some() {
        return Ok(first);
    }
    // The weights' layout is known once the index (if any) is here.
    let files = match download("model.safetensors.index.json") {
        Ok(index) => needed_files(Some(&index))?,
        Err(_) => needed_files(None)?,
    };
    for file in &files {
        download(file)?;
    }
    Ok(first.parent().expect("a snapshot directory").to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_paths_do_not() {
        let id = HubId::parse("Qwen/Qwen2.5-1.5B-Instruct").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str(), id.file),
            ("Qwen/Qwen2.5-1.5B-Instruct", "main", None)
        );
        let id = HubId::parse("org/name@v1.0:model-q4_k_m.gguf").unwrap();
        assert_eq!(id.revision, "v1.0");
        assert_eq!(id.file.as_deref(), Some("model-q4_k_m.gguf"));
        assert_eq!(id.to_string(), "org/name@v1.0:model-q4_k_m.gguf");
        // (A two-part relative path looks like an id: the CLI tries a path
        // that exists first.)
        for path in [
            "model.gguf",
            "./org/name",
            "/abs/org",
            "a/b/c",
            "../x/y",
            "org/",
            "/name",
            "org/name@",
            "C:/x",
            "org/name:dir/file",
        ] {
            assert_eq!(HubId::parse(path), None, "{path}");
        }
    }
}
