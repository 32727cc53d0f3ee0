//! Who besides the agent can change what it trusts: its config file, its
//! token and password files, and its `data_dir`.
//!
//! A queue the agent acknowledged writes into is only as safe as its
//! directory: another local user who can write there (or in a directory
//! above it) can rename the queue away, and after a restart the acknowledged
//! lines are gone without a word; one who can write the config or a token
//! file can send the data anywhere. So the agent refuses to start when such
//! a path, or a directory on the way to it, is writable by other users
//! (without the sticky bit, which keeps others from renaming what they do
//! not own, as in `/tmp`) or owned by anyone but the agent's user or root.
//! Group-writable paths are only warned about: a group may be trusted on
//! purpose (an `edge-replicator` group of operators).
//!
//! Both the path as written and the path with its links resolved are
//! checked, so a link in a directory others can write is caught as well as
//! the directory it leads to.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The effective user id the agent runs as.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Checks `path` (which must exist) and the directories above it for a
/// process running as `uid`. `Err` is why the agent must not use it, one
/// lower-case phrase to follow the path's name and a colon; `Ok` holds
/// warnings of the same form.
pub fn check(path: &Path, uid: u32) -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot be inspected: {e}"))?;
    let mode = meta.mode() & 0o7777;
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(format!(
            "owned by uid {}, not by the agent's user (uid {uid}) or root; chown it",
            meta.uid()
        ));
    }
    if mode & 0o002 != 0 {
        return Err(format!(
            "writable by other users (mode {mode:04o}); chmod o-w it"
        ));
    }
    if mode & 0o020 != 0 {
        warnings.push(format!(
            "writable by its group (mode {mode:04o}); chmod g-w it unless every member is trusted"
        ));
    }
    for dir in directories_above(path) {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        let mode = meta.mode() & 0o7777;
        if meta.uid() != uid && meta.uid() != 0 {
            return Err(format!(
                "its directory {dir:?} is owned by uid {}, not by the agent's user (uid {uid}) or root",
                meta.uid()
            ));
        }
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Err(format!(
                "its directory {dir:?} is writable by other users without the sticky bit (mode {mode:04o})"
            ));
        }
    }
    Ok(warnings)
}

/// The directories `path` is found through: its lexical parents (made
/// absolute) and those of the path its links resolve to.
fn directories_above(path: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let lexical = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let resolved = std::fs::canonicalize(path).ok();
    for p in std::iter::once(lexical).chain(resolved) {
        for dir in p.ancestors().skip(1) {
            if !dir.as_os_str().is_empty() && !out.iter().any(|d| d == dir) {
                out.push(dir.to_path_buf());
            }
        }
    }
    out
}

/// Where a directory that does not exist yet would be created: the
/// nearest existing one above it, which is what decides who could rename it.
pub fn nearest_existing(path: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(path).ok()?;
    abs.ancestors()
        .find(|p| std::fs::symlink_metadata(p).is_ok())
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn modes_of_the_path_itself() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, "x").unwrap();
        let me = euid();
        let cases: &[(u32, Result<usize, &str>)] = &[
            (0o600, Ok(0)),
            (0o644, Ok(0)),
            (0o640, Ok(0)),
            (0o664, Ok(1)),
            (0o620, Ok(1)),
            (0o646, Err("writable by other users (mode 0646)")),
            (0o602, Err("writable by other users (mode 0602)")),
            (0o777, Err("writable by other users (mode 0777)")),
        ];
        for &(mode, ref want) in cases {
            chmod(&file, mode);
            match (check(&file, me), want) {
                (Ok(w), Ok(n)) => {
                    assert_eq!(w.len(), *n, "{mode:o}: {w:?}");
                    for w in w {
                        assert!(w.contains("writable by its group"), "{w}");
                    }
                }
                (Err(e), Err(want)) => assert!(e.starts_with(want), "{mode:o}: {e}"),
                (got, want) => panic!("{mode:o}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn directories_above_count() {
        let root = tempfile::tempdir().unwrap();
        let shared = root.path().join("shared");
        let data = shared.join("data");
        fs::create_dir_all(&data).unwrap();
        let me = euid();
        chmod(&shared, 0o777);
        let e = check(&data, me).unwrap_err();
        assert!(e.contains("without the sticky bit (mode 0777)"), "{e}");
        assert!(e.contains(&format!("{shared:?}")), "{e}");
        // The sticky bit keeps others from renaming what is not theirs.
        chmod(&shared, 0o1777);
        assert_eq!(check(&data, me), Ok(vec![]));
        chmod(&shared, 0o755);
        // A link in a directory others can write is caught, and so is a
        // link that leads into one.
        let open = root.path().join("open");
        fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let link = open.join("link");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        assert!(check(&link, me).unwrap_err().contains("open"));
        let inner = open.join("inner");
        fs::create_dir(&inner).unwrap();
        let elsewhere = shared.join("to-inner");
        std::os::unix::fs::symlink(&inner, &elsewhere).unwrap();
        assert!(check(&elsewhere, me).unwrap_err().contains("open"));
    }

    /// Ownership needs root to set up; as another user the test checks
    /// what it can.
    #[test]
    fn owners_other_than_the_agent_or_root_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("f");
        fs::write(&file, "x").unwrap();
        let me = euid();
        assert_eq!(check(&file, me), Ok(vec![]));
        // As seen by another agent user, a file of ours is foreign
        // (unless we are root, whom every agent trusts).
        let other = if me == 12345 { 12346 } else { 12345 };
        if me != 0 {
            let e = check(&file, other).unwrap_err();
            assert!(e.contains(&format!("owned by uid {me}")), "{e}");
            return;
        }
        std::os::unix::fs::chown(&file, Some(12345), None).unwrap();
        let e = check(&file, 0).unwrap_err();
        assert!(e.starts_with("owned by uid 12345"), "{e}");
        assert_eq!(check(&file, 12345), Ok(vec![]), "the agent's own user");
        let sub = root.path().join("sub");
        fs::create_dir(&sub).unwrap();
        fs::write(sub.join("g"), "x").unwrap();
        std::os::unix::fs::chown(&sub, Some(12345), None).unwrap();
        let e = check(&sub.join("g"), 0).unwrap_err();
        assert!(
            e.contains("directory") && e.contains("is owned by uid 12345"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_directory_is_judged_by_where_it_would_be_made() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("a/b/c");
        assert_eq!(nearest_existing(&missing), Some(root.path().to_path_buf()));
    }
}
