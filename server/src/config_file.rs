//! `--config collab.toml`: every setting as a top-level key named like its flag with `_` for
//! `-`. The file is read before the command line is parsed and each key becomes the value of
//! its environment variable when that variable is not set, so one precedence order holds:
//! flag > environment > file > default.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::config::Cli;

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: unknown key `{key}` (keys are the flags of `collab --help` with _ for -)")]
    UnknownKey { path: PathBuf, key: String },
    #[error("{path}: invalid value for `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The `--config` path from the arguments or `COLLAB_CONFIG`.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let arg = arg.to_string_lossy();
        if arg == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(p) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("COLLAB_CONFIG").map(PathBuf::from)
}

/// The file's key for a flag: its long name with `_` for `-`.
fn key_of(arg: &clap::Arg) -> Option<String> {
    arg.get_long().map(|l| l.replace('-', "_"))
}

fn as_arg_value(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Array(items) => items
            .iter()
            .map(as_arg_value)
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        _ => None,
    }
}

/// Reads the config file named by the arguments (if any) into the environment.
pub fn apply(args: &[OsString]) -> Result<Option<PathBuf>, ConfigFileError> {
    let Some(path) = config_path(args) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigFileError::Read {
        path: path.clone(),
        source,
    })?;
    for (env, value) in settings(&path, &text)? {
        if std::env::var_os(&env).is_none() {
            // Single-threaded here: main calls this before anything else starts.
            std::env::set_var(env, value);
        }
    }
    Ok(Some(path))
}

/// The (environment variable, value) pairs a config file sets, each checked with the flag's own
/// parser so a bad value is reported by its key.
pub fn settings(path: &Path, text: &str) -> Result<Vec<(String, String)>, ConfigFileError> {
    let table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigFileError::Syntax {
                path: path.to_owned(),
                message: e.message().to_owned(),
            })?;
    let cmd = Cli::command();
    let mut out = Vec::new();
    for (key, value) in &table {
        let unknown = || ConfigFileError::UnknownKey {
            path: path.to_owned(),
            key: key.clone(),
        };
        let arg = cmd
            .get_arguments()
            .find(|a| key_of(a).as_deref() == Some(key.as_str()) && key != "config")
            .ok_or_else(unknown)?;
        let env = arg
            .get_env()
            .ok_or_else(unknown)?
            .to_string_lossy()
            .into_owned();
        let invalid = |message: String| ConfigFileError::Invalid {
            path: path.to_owned(),
            key: key.clone(),
            message,
        };
        if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
            let toml::Value::Boolean(b) = value else {
                return Err(invalid("expected true or false".into()));
            };
            out.push((env, b.to_string()));
            continue;
        }
        let value = as_arg_value(value)
            .ok_or_else(|| invalid("expected a string, number, boolean or array".into()))?;
        // The flag's own parser decides, exactly as if the value were on the command line.
        let long = arg.get_long().ok_or_else(unknown)?;
        let probe = [
            OsString::from("collab"),
            OsString::from(format!("--{long}={value}")),
        ];
        if let Err(e) = Cli::command().try_get_matches_from(probe) {
            if e.kind() == clap::error::ErrorKind::InvalidValue
                || e.kind() == clap::error::ErrorKind::ValueValidation
            {
                let message = e.to_string();
                let first = message.lines().next().unwrap_or_default();
                return Err(invalid(first.trim_start_matches("error: ").to_owned()));
            }
        }
        out.push((env, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_environment_values() {
        let s = settings(
            Path::new("t.toml"),
            "addr = \"0.0.0.0:9000\"\nmax_message_size = 1024\nallow_anonymous = true\nallowed_origins = [\"https://a\", \"https://b\"]\n",
        )
        .unwrap();
        assert!(s.contains(&("COLLAB_ADDR".into(), "0.0.0.0:9000".into())));
        assert!(s.contains(&("COLLAB_MAX_MESSAGE_SIZE".into(), "1024".into())));
        assert!(s.contains(&("COLLAB_ALLOW_ANONYMOUS".into(), "true".into())));
        assert!(s.contains(&(
            "COLLAB_ALLOWED_ORIGINS".into(),
            "https://a,https://b".into()
        )));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = settings(Path::new("t.toml"), "max_mesage_size = 1\n").unwrap_err();
        assert!(e.to_string().contains("max_mesage_size"), "{e}");
        let e = settings(Path::new("t.toml"), "max_message_size = \"big\"\n").unwrap_err();
        assert!(e.to_string().contains("max_message_size"), "{e}");
        let e = settings(Path::new("t.toml"), "log_format = \"xml\"\n").unwrap_err();
        assert!(e.to_string().contains("log_format"), "{e}");
    }

    /// The example file in the repository lists every setting (and nothing else).
    #[test]
    fn the_example_file_lists_every_setting() {
        let example = include_str!("../../collab.example.toml");
        let listed: std::collections::BTreeSet<String> = example
            .lines()
            .filter_map(|l| l.trim_start_matches('#').trim().split_once(" = "))
            .map(|(k, _)| k.trim().to_owned())
            .collect();
        let expected: std::collections::BTreeSet<String> = Cli::command()
            .get_arguments()
            .filter(|a| a.get_env().is_some() && a.get_id() != "config")
            .filter_map(key_of)
            .collect();
        assert_eq!(listed, expected);
    }
}
