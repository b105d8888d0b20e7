//! The `--state-dir` is private: a missing one is created 0700, a writable-by-others one refused.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::PermissionsExt as _;

use local_shim::{Store, StoreError};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn group_writable_state_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [0o770, 0o702, 0o777, 0o1777] {
        let state = dir.path().join(format!("state-{bad:o}"));
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(bad)).unwrap();

        let err = Store::open(&state).unwrap_err();
        assert!(
            matches!(&err, StoreError::StateDirWritableByOthers { path, mode }
                if path == &state && *mode == bad),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&state.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("{bad:04o}")), "{msg}");
        assert!(
            !state.join(Store::FILE_NAME).exists(),
            "database created in a refused directory"
        );
    }
}

#[test]
fn missing_state_dir_is_created_0700() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("a").join("state");
    let store = Store::open(&state).unwrap();
    assert_eq!(mode(&state), 0o700, "mode {:o}", mode(&state));
    assert!(store.path().exists());
}

#[test]
fn existing_private_or_read_only_for_others_dir_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    for good in [0o700, 0o755, 0o750] {
        let state = dir.path().join(format!("state-{good:o}"));
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(good)).unwrap();
        drop(Store::open(&state).unwrap());
        // An existing directory's mode is the operator's choice; it is not changed.
        assert_eq!(mode(&state), good);
    }
}
