//! Models by their Hugging Face id, offline, from a cache laid out the way
//! the hub client lays it out (refs/main naming a commit, snapshots of
//! symlinks into content-addressed blobs), built here from a tiny model.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::{r3_with, tiny_model_and_data};

/// `model_dir`'s files as repository `org/name` at one commit of `hub`.
fn lay_out_cache(hub: &Path, repo: &str, model_dir: &Path) -> String {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let root = hub.join(format!("models--{}", repo.replace('/', "--")));
    let (blobs, snapshot) = (root.join("blobs"), root.join("snapshots").join(commit));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), commit).unwrap();
    for entry in std::fs::read_dir(model_dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        // Blobs are named by their content; any unique name will do here.
        let blob = format!(
            "{:016x}{:08x}",
            bytes.len(),
            bytes.iter().map(|&b| b as u32).sum::<u32>()
        );
        std::fs::write(blobs.join(&blob), &bytes).unwrap();
        let name = path.file_name().unwrap();
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob), snapshot.join(name))
            .unwrap();
    }
    commit.to_string()
}

#[test]
fn a_model_by_its_hub_id_loads_from_the_shared_cache_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = tiny_model_and_data(dir.path(), 4, "7");
    let hub = dir.path().join("hf/hub");
    let commit = lay_out_cache(&hub, "r3-tests/tiny", Path::new(&model));
    let env = [
        ("HF_HUB_CACHE", hub.as_os_str()),
        ("HF_HUB_OFFLINE", OsStr::new("1")),
    ];
    std::fs::write(
        dir.path().join("m.json"),
        r#"[{"role": "user", "content": "What is 1 + 2?"}]"#,
    )
    .unwrap();
    let logits = |model: &str| {
        let (ok, out, err) = r3_with(
            dir.path(),
            &env,
            &["logits", "--messages", "m.json", "--model", model],
        );
        assert!(ok, "{model}: {err}");
        out
    };
    let local = logits(&model);
    assert_eq!(logits("r3-tests/tiny"), local);
    assert_eq!(logits(&format!("r3-tests/tiny@{commit}")), local);
    // HF_HOME/hub is the cache when HF_HUB_CACHE is not set.
    let (ok, out, err) = r3_with(
        dir.path(),
        &[
            ("HF_HOME", dir.path().join("hf").as_os_str()),
            ("HF_HUB_OFFLINE", OsStr::new("1")),
        ],
        &["logits", "--messages", "m.json", "--model", "r3-tests/tiny"],
    );
    assert!(ok && out == local, "{err}");

    // A model that is not there names the id, the cache and the fix.
    let (ok, _, err) = r3_with(
        dir.path(),
        &env,
        &[
            "logits",
            "--messages",
            "m.json",
            "--model",
            "r3-tests/absent",
        ],
    );
    assert!(
        !ok && err.contains("r3-tests/absent")
            && err.contains(hub.to_str().unwrap())
            && err.contains("huggingface-cli download r3-tests/absent"),
        "{err}"
    );

    // An adapter trained on it names its base by the id, and loads (a
    // verifier that fails everything: the step trains nothing, and the
    // checkpoint is what is checked).
    let verifier = dir.path().join("verify.py");
    std::fs::write(&verifier, "import json, sys\nfor line in sys.stdin:\n    m = json.loads(line)\n    print(json.dumps({\"id\": m[\"id\"], \"success\": False}), flush=True)\n").unwrap();
    let verifier = format!("verifier=python3 {}", verifier.display());
    let (ok, _, err) = r3_with(
        dir.path(),
        &env,
        &[
            "mine",
            "--model",
            "r3-tests/tiny",
            "--verifier",
            &verifier[9..],
            "--data",
            &data,
            "--samples",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            "failures.jsonl",
        ],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = r3_with(
        dir.path(),
        &env,
        &[
            "train",
            "--use-peft",
            "--set",
            "model=r3-tests/tiny",
            "--set",
            &verifier,
            "--set",
            "failures=failures.jsonl",
            "--set",
            "output_dir=run",
            "--set",
            "max_steps=1",
            "--set",
            "failures_per_step=1",
            "--set",
            "num_generations=2",
            "--set",
            "max_completion_length=4",
            "--set",
            "retry_max_tokens=4",
        ],
    );
    assert!(ok, "{err}");
    let config =
        std::fs::read_to_string(dir.path().join("run/checkpoint-1/adapter_config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["base_model_name_or_path"], "r3-tests/tiny");
    logits("run/checkpoint-1");
}
