//! Stamps the binary with what `metastore --version` prints: the git commit it was built from
//! and the compiler that built it (etcd prints its git SHA and Go version the same way).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let sha = git(&["rev-parse", "--short=7", "HEAD"]).unwrap_or_else(|| "GitNotFound".into());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rust_version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        // "rustc 1.91.0 (f8297e351 2025-10-28)" -> "1.91.0"
        .and_then(|s| s.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=METASTORE_GIT_SHA={sha}");
    println!("cargo:rustc-env=METASTORE_RUST_VERSION={rust_version}");
    println!("cargo:rerun-if-env-changed=RUSTC");
    // Release binaries keep line tables for readable profiles and backtraces, but compressed
    // (ELF SHF_COMPRESSED, read by perf, gdb and addr2line): 24 MB of DWARF would otherwise
    // double the binary operators ship. Only the link of this package's binary changes.
    if std::env::var("PROFILE").as_deref() == Ok("release")
        && std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,--compress-debug-sections=zlib");
    }
    // A new commit changes HEAD (detached) or the branch's ref (loose or packed): rerun then,
    // and only then, so the SHA is never stale and ordinary builds do not rerun this.
    for file in ["HEAD", "packed-refs"] {
        if let Some(path) = git_path(file) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git_path(&branch) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

/// The file behind `name` in the git dir; only existing files are worth watching (cargo
/// reruns the script on every build for a path that does not exist).
fn git_path(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(git(&["rev-parse", "--git-path", name])?);
    let path = if path.is_absolute() {
        path
    } else {
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").ok()?).join(path)
    };
    path.exists().then_some(path)
}
