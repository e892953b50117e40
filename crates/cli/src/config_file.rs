//! `--config FILE`, one way for every command that takes it: a TOML file
//! of the command's settings, placed on the command line before what the
//! user typed, so that the command line wins (`r3 eval --config eval.toml
//! --limit 5`, `r3 train --config r3.toml --set max_steps=3`). For `r3
//! eval` and `r3 mine` the keys are the long flags (`max_new_tokens = 64`,
//! `skip_invalid = true`); for `r3 train` they are the training config's
//! keys (TRL's names), each becoming a `--set key=value`. Every key is
//! checked here, so that an error names the file and the key.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::CommandFactory;

/// The commands whose `--config` this file reads.
const COMMANDS: [&str; 3] = ["eval", "mine", "train"];

/// `args` (the whole command line, program name first) with the settings of
/// an `eval` or `mine` command's `--config FILE` inserted as flags right
/// after the command's name; any other command line as it is.
pub fn expand(args: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(command) = args.get(1).and_then(|a| a.to_str()) else {
        return Ok(args);
    };
    if !COMMANDS.contains(&command) {
        return Ok(args);
    }
    let Some(path) = config_path(&args[2..]) else {
        return Ok(args);
    };
    let flags = flags_from_file(command, Path::new(&path))?;
    let mut out = args[..2].to_vec();
    out.extend(flags);
    out.extend_from_slice(&args[2..]);
    Ok(out)
}

/// The value of `--config FILE` or `--config=FILE`, if given.
fn config_path(args: &[OsString]) -> Option<OsString> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--config" {
            return args.next().cloned();
        }
        if let Some(value) = text.strip_prefix("--config=") {
            return Some(value.into());
        }
    }
    None
}

/// The file's settings as `--flag value` arguments of `command`. Each key
/// is checked here, naming the file and the key: an unknown key, a boolean
/// for a flag that takes a value (`limit = false` is not "no limit"), a
/// value for a switch, or a value the flag's own parser refuses.
fn flags_from_file(command: &str, path: &Path) -> Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
    if command == "train" {
        return training_settings(path, table);
    }
    let cli = crate::Cli::command();
    let sub = cli
        .find_subcommand(command)
        .expect("eval and mine are subcommands");
    let known: Vec<&clap::Arg> = sub
        .get_arguments()
        .filter(|a| a.get_long().is_some_and(|long| long != "config"))
        .collect();
    let mut flags = Vec::new();
    for (key, value) in table {
        // `engines = [...]`, as `r3 train`'s config spells it.
        let flag = match key.as_str() {
            "engines" => "engine".to_string(),
            _ => key.replace('_', "-"),
        };
        let Some(arg) = known.iter().find(|a| a.get_long() == Some(flag.as_str())) else {
            let valid: Vec<String> = known
                .iter()
                .filter_map(|a| a.get_long())
                .map(|k| k.replace('-', "_"))
                .collect();
            bail!(
                "{}: unknown key '{key}' for r3 {command} (valid: {})",
                path.display(),
                valid.join(", ")
            );
        };
        let switch = !arg.get_action().takes_values();
        let value = match (value, switch) {
            (toml::Value::Boolean(on), true) => {
                if on {
                    flags.push(OsString::from(format!("--{flag}")));
                }
                continue;
            }
            (toml::Value::String(s), false) => s,
            // A list, for a flag that takes several values (`engine`).
            (toml::Value::Array(items), false) if arg.get_value_delimiter().is_some() => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("{}: '{key}' must be a list of strings", path.display()))?
                .join(","),
            (toml::Value::Integer(n), false) => n.to_string(),
            (toml::Value::Float(x), false) => x.to_string(),
            (other, true) => bail!(
                "{}: '{key}' is a switch: give true or false, not {}",
                path.display(),
                other.type_str()
            ),
            (other, false) => bail!(
                "{}: '{key}' takes a value (a string or a number), not {}",
                path.display(),
                other.type_str()
            ),
        };
        // The flag's own parser judges the value now, so that its error
        // names the file; that the rest of the command line is missing yet
        // is no error here.
        let alone = [command.to_string(), format!("--{flag}"), value.clone()];
        if let Err(e) = sub.clone().try_get_matches_from(alone) {
            use clap::error::ErrorKind::{InvalidUtf8, InvalidValue, ValueValidation};
            if matches!(e.kind(), InvalidValue | ValueValidation | InvalidUtf8) {
                let why = e.to_string();
                let why = why
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches("error: ");
                bail!("{}: '{key}' = {value:?}: {why}", path.display());
            }
        }
        flags.push(OsString::from(format!("--{flag}")));
        flags.push(OsString::from(value));
    }
    Ok(flags)
}

/// A training config's settings as `--set key=value` arguments (values in
/// TOML syntax), each checked against `TrainConfig`.
fn training_settings(path: &Path, table: toml::Table) -> Result<Vec<OsString>> {
    let mut flags = Vec::with_capacity(2 * table.len());
    for (key, value) in table {
        if let Err(e) = r3_train::config::TrainConfig::check_setting(&key, &value) {
            bail!("{}: '{key}' = {value}: {e}", path.display());
        }
        flags.push(OsString::from("--set"));
        flags.push(OsString::from(format!("{key}={value}")));
    }
    Ok(flags)
}
