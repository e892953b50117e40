//! Bad training configs are rejected before any work starts, naming the key.

use r3_train::config::{Schedule, TrainConfig};

fn error(text: &str, overrides: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r3.toml");
    std::fs::write(&path, text).unwrap();
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    TrainConfig::load(Some(&path), &overrides)
        .unwrap_err()
        .to_string()
}

#[test]
fn unknown_keys_and_impossible_values_name_the_key() {
    assert!(error("learnig_rate = 1e-6\n", &[]).contains("learnig_rate"));
    assert!(error("num_generations = 1\n", &[]).contains("num_generations"));
    assert!(error("learning_rate = -1e-6\n", &[]).contains("learning_rate"));
    assert!(error("loss_type = \"ppo\"\n", &[]).contains("ppo"));
    assert!(error("", &["beta=-0.1"]).contains("beta"));
    assert!(error("", &["top_p=0"]).contains("top_p"));
    assert!(error("", &["nonsense"]).contains("key=value"));
    let e = error(
        "int8_decode = true\nengines = [\"http://127.0.0.1:9\"]\n",
        &[],
    );
    assert!(e.contains("int8_decode"), "{e}");
    for bad in [
        "bf16_products = true\n",
        "bf16_products = true\nuse_peft = true\ndtype = \"bf16\"\n",
    ] {
        let e = error(bad, &[]);
        assert!(e.contains("bf16_products"), "{bad}: {e}");
    }
    assert!(error("max_steps = \"many\"\n", &[]).contains("max_steps"));
    for timeout in ["-1", "nan", "inf", "1e300", "0"] {
        let e = error("", &[&format!("verifier_timeout={timeout}")]);
        assert!(e.contains("verifier_timeout"), "{timeout}: {e}");
    }
    let e = error("verifier_timeout = -1.0\n", &[]);
    assert!(e.contains("verifier_timeout"), "{e}");
}

#[test]
fn flags_override_the_file_and_defaults_follow_the_paper() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r3.toml");
    std::fs::write(
        &path,
        "learning_rate = 1e-6\nmax_steps = 10\nlr_scheduler_type = \"cosine\"\nwarmup_steps = 2\n",
    )
    .unwrap();
    let c = TrainConfig::load(
        Some(&path),
        &["max_steps=20".into(), "task=countdown".into()],
    )
    .unwrap();
    assert_eq!(
        (c.max_steps, c.task.as_str(), c.learning_rate),
        (20, "countdown", 1e-6)
    );
    assert_eq!(c.lr_scheduler_type, Schedule::Cosine);
    assert!((c.learning_rate_at(0) - 0.5e-6).abs() < 1e-15, "warm-up");
    assert!(
        (c.learning_rate_at(2) - 1e-6).abs() < 1e-15,
        "peak after warm-up"
    );
    assert!(c.learning_rate_at(19) < 0.01e-6, "cosine decays to ~0");
    let d = TrainConfig::default();
    assert_eq!(
        (d.num_generations, d.temperature, d.beta, d.learning_rate),
        (8, 0.9, 0.001, 5e-7)
    );
    assert_eq!(d.retry_temperature, 0.0);
}

#[test]
fn lora_settings_take_peft_names_and_are_checked() {
    let e = error(
        "use_peft = true\nlora_target_modules = [\"q_proj\", \"qkv\"]\n",
        &[],
    );
    assert!(
        e.contains("unknown LoRA target module 'qkv'") && e.contains("down_proj"),
        "{e}"
    );
    assert!(error("use_peft = true\nlora_r = 0\n", &[]).contains("lora_r"));
    assert!(error("", &["lora_dropout=0.05"]).contains("lora_dropout"));
    assert!(error("adapter = \"x\"\n", &[]).contains("use_peft"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r3.toml");
    std::fs::write(
        &path,
        "use_peft = true\nlora_target_modules = \"all-linear\"\n",
    )
    .unwrap();
    let config = TrainConfig::load(Some(&path), &["lora_r=8".into()]).unwrap();
    let lora = config.lora().unwrap().unwrap();
    assert_eq!(
        (lora.r, lora.alpha, lora.target_modules.len()),
        (8, 32.0, 7)
    );
    std::fs::write(
        &path,
        "use_peft = true\nlora_target_modules = [\"v_proj\", \"q_proj\"]\n",
    )
    .unwrap();
    let lora = TrainConfig::load(Some(&path), &[])
        .unwrap()
        .lora()
        .unwrap()
        .unwrap();
    assert_eq!(lora.target_modules, ["q_proj", "v_proj"]);
    assert!(TrainConfig::default().lora().unwrap().is_none());
}

/// docs/config.md lists every key of `TrainConfig` with its default, and
/// nothing else: a key added, renamed or given a new default fails here
/// until the manual says so.
#[test]
fn the_manual_lists_every_key_with_its_default() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/config.md");
    let text = std::fs::read_to_string(path).unwrap();
    let documented: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let key = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let default = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((key.to_string(), default.to_string()))
        })
        .filter(|(key, _)| key != "key")
        .collect();
    let defaults = toml::Value::try_from(TrainConfig::default()).unwrap();
    let defaults = defaults.as_table().unwrap();
    let mut keys: Vec<&String> = documented.iter().map(|(k, _)| k).collect();
    keys.sort();
    // Every field, unset options included (TOML leaves those out).
    let fields = serde_json::to_value(TrainConfig::default()).unwrap();
    let mut actual: Vec<&String> = fields.as_object().unwrap().keys().collect();
    actual.sort();
    assert_eq!(
        keys, actual,
        "docs/config.md and TrainConfig list other keys"
    );
    for (key, default) in &documented {
        match defaults.get(key) {
            None => assert_eq!(default, "(unset)", "{key}"),
            Some(value) => {
                let written: toml::Table = toml::from_str(&format!("v = {default}"))
                    .unwrap_or_else(|e| panic!("{key}: default `{default}` is not TOML: {e}"));
                assert_eq!(&written["v"], value, "{key}: docs say {default}");
            }
        }
    }
}
