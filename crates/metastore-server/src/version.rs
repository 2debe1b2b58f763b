//! What `metastore --version` prints, in etcd's layout, and the same facts for the start log.

/// This build's version (the workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit the binary was built from; `GitNotFound` outside a git checkout, as etcd says.
pub const GIT_SHA: &str = env!("METASTORE_GIT_SHA");
/// The compiler that built it.
pub const RUST_VERSION: &str = env!("METASTORE_RUST_VERSION");
/// The etcd API level served (what `Status.version` and `/version` report as etcd 3.5).
pub const API_VERSION: &str = "3.5";

/// `metastore --version` and `metastore version`, laid out as `etcd --version` prints.
pub fn version_text() -> String {
    format!(
        "metastore Version: {VERSION}\nGit SHA: {GIT_SHA}\nRust Version: {RUST_VERSION}\nRust OS/Arch: {}/{}\nAPI Version: {API_VERSION}\n",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_text_has_etcds_lines() {
        let text = version_text();
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_once(": ").map(|(k, _)| k))
            .collect();
        assert_eq!(
            keys,
            [
                "metastore Version",
                "Git SHA",
                "Rust Version",
                "Rust OS/Arch",
                "API Version"
            ]
        );
        assert!(text.contains(&format!("metastore Version: {VERSION}\n")));
        assert!(!GIT_SHA.is_empty() && !RUST_VERSION.is_empty());
    }
}
