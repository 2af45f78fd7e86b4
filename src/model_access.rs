//! Which base models a job may name. A local path is read by the server with the server's
//! rights, so only paths under the operator's `--allow-model-dirs` are accepted; a Hub repo id
//! must be well formed (`owner/name`, no `..`, no percent-escapes) and one of the operator's
//! `--allow-hub` entries (`owner/name`, `owner/*`, or `*` for any): none are allowed unless
//! listed. Whatever is refused gets the same answer, so a caller cannot tell a missing path
//! from a forbidden one.

use std::path::{Path, PathBuf};

use crate::config::ServeConfig;

pub const NOT_ALLOWED: &str = "not an allowed model: a .gguf file or model folder under the \
     server's --allow-model-dirs, or a Hub repo id (owner/name) the server allows";

/// `owner/name` with each part of ASCII letters, digits, `-`, `_`, `.`, starting with a letter
/// or digit, at most 96 characters: what the Hub itself accepts, and nothing a path or URL could
/// read as `..`.
pub fn is_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            (1..=96).contains(&p.len())
                && p.starts_with(|c: char| c.is_ascii_alphanumeric())
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !p.contains("..")
        })
}

/// Whether a job may use `base_model` on this server: a name of the operator's `--models`
/// catalogue, or a path or Hub id the operator allows.
pub fn check_base_model(config: &ServeConfig, base_model: &str) -> Result<(), &'static str> {
    if config
        .catalogue()
        .iter()
        .any(|(name, _)| name == base_model)
    {
        return Ok(());
    }
    let path = Path::new(base_model);
    // what the engine treats as local: a .gguf file or an existing folder
    if base_model.ends_with(".gguf") || path.is_dir() {
        return match path.canonicalize() {
            Ok(real) if under_any(&real, &config.allow_model_dirs) => Ok(()),
            _ => Err(NOT_ALLOWED),
        };
    }
    if !is_repo_id(base_model) {
        return Err(NOT_ALLOWED);
    }
    // closed unless the operator lists repos: a Hub download is the server's bandwidth, disk
    // and memory, spent on whatever repo a tenant names
    let allowed = config.allow_hub.iter().map(|e| e.trim()).any(|entry| {
        entry == "*"
            || match entry.strip_suffix("/*") {
                Some(owner) => base_model
                    .split('/')
                    .next()
                    .is_some_and(|o| o.eq_ignore_ascii_case(owner)),
                None => entry.eq_ignore_ascii_case(base_model),
            }
    });
    if allowed {
        Ok(())
    } else {
        Err(NOT_ALLOWED)
    }
}

/// `path` as the folder it really is, if it is one under the operator's `--allow-model-dirs`
/// (what vLLM's `load_lora_adapter` names: a folder on the server).
pub fn allowed_folder(config: &ServeConfig, path: &str) -> Result<PathBuf, &'static str> {
    match Path::new(path).canonicalize() {
        Ok(real) if real.is_dir() && under_any(&real, &config.allow_model_dirs) => Ok(real),
        _ => Err(NOT_ALLOWED),
    }
}

/// What a fine-tuned model's name says of its base: a catalogue name or a Hub id as it is, and
/// of a path only its last part (without `.gguf`): never where the server keeps it.
pub fn display_name(base_model: &str) -> String {
    let local = base_model.starts_with(['/', '.'])
        || base_model.ends_with(".gguf")
        || Path::new(base_model).is_dir();
    if !local {
        return base_model.to_string();
    }
    let last = Path::new(base_model)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    last.strip_suffix(".gguf").unwrap_or(&last).to_string()
}

fn under_any(real: &Path, dirs: &[PathBuf]) -> bool {
    dirs.iter()
        .filter_map(|d| d.canonicalize().ok())
        .any(|d| real.starts_with(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_strict() {
        for ok in [
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "google/gemma-3-270m",
            "a/b.c_d",
        ] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in [
            "../etc",
            "a/..",
            "a/.x",
            "a/b/c",
            "a",
            "a/b%2F..",
            "/abs/path",
            "a/b c",
            "",
        ] {
            assert!(!is_repo_id(bad), "{bad}");
        }
    }

    #[test]
    fn local_models_only_under_allowed_dirs() {
        let dir = tempfile_dir();
        let inside = dir.join("m.gguf");
        std::fs::write(&inside, b"x").unwrap();
        let mut config = ServeConfig::for_data_dir(dir.join("data"));
        assert_eq!(
            check_base_model(&config, inside.to_str().unwrap()),
            Err(NOT_ALLOWED)
        );
        config.allow_model_dirs = vec![dir.clone()];
        assert_eq!(check_base_model(&config, inside.to_str().unwrap()), Ok(()));
        // a missing file and a forbidden one read the same
        assert_eq!(
            check_base_model(&config, "/etc/nothing.gguf"),
            Err(NOT_ALLOWED)
        );
        assert_eq!(check_base_model(&config, "/etc"), Err(NOT_ALLOWED));
        // the Hub: closed unless listed
        assert_eq!(
            check_base_model(&config, "google/gemma-3-270m"),
            Err(NOT_ALLOWED)
        );
        config.allow_hub = vec!["google/*".into()];
        assert_eq!(check_base_model(&config, "google/gemma-3-270m"), Ok(()));
        assert_eq!(check_base_model(&config, "evil/model"), Err(NOT_ALLOWED));
        config.allow_hub = vec!["*".into()];
        assert_eq!(check_base_model(&config, "evil/model"), Ok(()));
        assert_eq!(check_base_model(&config, "evil/.."), Err(NOT_ALLOWED));
        std::fs::remove_dir_all(&dir).ok();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qtune-model-access-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
