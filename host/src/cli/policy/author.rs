//! `regcache policy new` and `build`: a policy author's project. `new` scaffolds a project bound
//! to the WIT that builds as is; `build` compiles one to a component.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use serde::Deserialize;

use regcache::policy::WIT;

/// The languages `new` scaffolds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A Rust crate (cargo, wasm32-wasip2).
    Rust,
    /// JavaScript (componentize-qjs).
    Js,
    /// Python (componentize-py).
    Python,
}

const TEMPLATE_MANIFEST: &str = include_str!("../../../templates/policy/Cargo.toml.tmpl");
const TEMPLATE_LIB: &str = include_str!("../../../templates/policy/src/lib.rs");

pub fn scaffold(dir: &Path, lang: Lang) -> anyhow::Result<ExitCode> {
    if lang != Lang::Rust {
        bail!("`--lang {lang:?}` is not written yet");
    }
    if dir.exists() && dir.read_dir()?.next().is_some() {
        bail!("{} exists and is not empty", dir.display());
    }
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| {
            n.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
                .to_lowercase()
        })
        .filter(|n| n.starts_with(|c: char| c.is_ascii_alphabetic()))
        .unwrap_or_else(|| "my-policy".into());
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::create_dir_all(dir.join("wit"))?;
    std::fs::write(
        dir.join("Cargo.toml"),
        TEMPLATE_MANIFEST.replace("{{name}}", &name),
    )?;
    std::fs::write(dir.join("src/lib.rs"), TEMPLATE_LIB)?;
    std::fs::write(dir.join("wit/policy.wit"), WIT)?;
    std::fs::write(dir.join(".gitignore"), "/target\n")?;
    println!("created policy crate `{name}` in {}", dir.display());
    println!("next: regcache policy build {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Builds with cargo for wasm32-wasip2 and returns the component's path, as cargo reports it.
pub fn build(dir: &Path) -> anyhow::Result<PathBuf> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.exists() {
        bail!(
            "{} has no Cargo.toml (create one with `regcache policy new`)",
            dir.display()
        );
    }
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--message-format=json-render-diagnostics",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("run cargo (is the Rust toolchain installed?)")?;
    if !output.status.success() {
        bail!(
            "cargo build failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`)"
        );
    }
    #[derive(Deserialize)]
    struct Artifact {
        reason: String,
        #[serde(default)]
        filenames: Vec<PathBuf>,
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Artifact>(line).ok())
        .filter(|a| a.reason == "compiler-artifact")
        .flat_map(|a| a.filenames)
        .find(|f| f.extension().is_some_and(|e| e == "wasm"))
        .context("cargo built no .wasm (is the crate a cdylib?)")
}
