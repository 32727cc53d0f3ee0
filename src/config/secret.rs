//! Secrets: [`Secret`], which never prints its value, and how a token or password is
//! read, inline or from `token_file`/`password_file` (small regular files, whose owners
//! and modes are checked). Its own module because `[listen]` and `[[remote]]` both hold
//! secrets and must treat them alike.

use std::fmt;
use std::path::Path;

use super::units::KIB;
use super::{invalid, Config, ConfigError, Validator};

/// A secret string (token or password). `Debug` and `Display` print `<redacted>`, so a
/// secret cannot reach a log line by accident; [`Secret::expose`] gives the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The secret's value, for the one place that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

pub(super) fn check_secret(key: &str, value: String) -> Result<Secret, ConfigError> {
    if value.is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(
            key,
            "contains a control character (a stray newline?)",
        ));
    }
    Ok(Secret(value))
}

impl Validator<'_> {
    /// A secret given inline (`field`) or read from `{field}_file`.
    pub(super) fn secret(
        &mut self,
        label: &str,
        field: &str,
        inline: Option<String>,
        file: Option<String>,
    ) -> Result<Option<Secret>, ConfigError> {
        match (inline, file) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(invalid(
                format!("{label}: {field}"),
                format!("{field} and {field}_file are mutually exclusive"),
            )),
            (Some(value), None) => check_secret(&format!("{label}: {field}"), value).map(Some),
            (None, Some(f)) => {
                let key = format!("{label}: {field}_file");
                if f.is_empty() {
                    return Err(invalid(key, "must not be empty"));
                }
                let path = self.resolve(&f);
                let text = read_secret_file(&key, &path)?;
                // Who may write it; who may read it is a warning below.
                if self.check_owners {
                    crate::trust::check(&path, crate::trust::euid())
                        .map_err(|why| invalid(format!("{key} {path:?}"), why))?;
                }
                self.check_permissions(&key, &path);
                let value = text.trim_end();
                if value.is_empty() {
                    return Err(invalid(format!("{key} {path:?}"), "file is empty"));
                }
                check_secret(&key, value.to_string()).map(Some)
            }
        }
    }

    #[cfg(unix)]
    fn check_permissions(&mut self, key: &str, path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            let who = if mode & 0o007 != 0 {
                "readable by others"
            } else {
                "accessible by its group"
            };
            self.warnings.push(format!(
                "{key} {path:?} is {who} (mode {mode:04o}); chmod 600 it"
            ));
        }
    }

    #[cfg(not(unix))]
    fn check_permissions(&mut self, _key: &str, _path: &Path) {}
}

/// Largest `token_file`/`password_file`: a secret is one line, and a file
/// that is more than a few lines is not the file the operator meant.
pub const MAX_SECRET_FILE: u64 = 64 * KIB;

/// Reads a secret file. Only a regular file of at most [`MAX_SECRET_FILE`]
/// bytes is read: `/dev/zero` or `/dev/urandom` would otherwise be read
/// until memory runs out, and a FIFO would block `check-config` forever
/// (the open does not wait for a writer, and a FIFO is then refused).
fn read_secret_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let file_error = |source| ConfigError::File {
        key: key.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path).map_err(file_error)?;
    let meta = file.metadata().map_err(file_error)?;
    if !meta.is_file() {
        let why = format!("not a regular file ({})", file_kind(&meta.file_type()));
        return Err(invalid(format!("{key} {path:?}"), why));
    }
    let too_large = || {
        invalid(
            format!("{key} {path:?}"),
            format!(
                "larger than {} KiB; a token or password file holds one line",
                MAX_SECRET_FILE / KIB
            ),
        )
    };
    if meta.len() > MAX_SECRET_FILE {
        return Err(too_large());
    }
    // The file may grow between the stat and the read.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(file_error)?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|_| invalid(format!("{key} {path:?}"), "not valid UTF-8"))
}

/// What a file that is not a regular one is, for an error message.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else {
        "not a plain file"
    }
}

/// A config file that holds a secret as written (not through `${VAR}` or a
/// `*_file`) and that any local user can read deserves a warning.
#[cfg(unix)]
pub(super) fn inline_secret_warning(path: &Path, text: &str, config: &Config) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    if mode & 0o004 == 0 {
        return None;
    }
    let remotes = config
        .remotes
        .iter()
        .flat_map(|r| [&r.token, &r.password])
        .flatten();
    let inline = config
        .listen
        .tokens
        .iter()
        .chain(remotes)
        .any(|s| text.contains(s.expose()));
    inline.then(|| {
        format!(
            "{path:?} holds a token or password and is readable by others (mode {mode:04o}); \
             chmod 640 it, or use token_file or ${{VAR}}"
        )
    })
}

#[cfg(not(unix))]
pub(super) fn inline_secret_warning(_path: &Path, _text: &str, _config: &Config) -> Option<String> {
    None
}
