//! The policies under `policy/`, built once per test process and handed out as bytes: the Rust
//! ones by cargo, those written in JavaScript and Python (`policy/lang/`) by `regcache policy
//! build`, as their authors build theirs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::binary::regcache_bin;

/// The repository root.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn built_dir() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = repo_root();
        let target_dir = root.join("target").join("policy");
        // Several test processes may build at once; cargo's own lock serialises them.
        let status = crate::binary::cargo()
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--workspace",
            ])
            .arg("--manifest-path")
            .arg(root.join("policy/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir)
            .env_remove("CARGO_TARGET_DIR")
            .status()
            .expect("run cargo to build the policies");
        assert!(status.success(), "building the policies failed");
        target_dir.join("wasm32-wasip2/release")
    })
}

/// Path of the built policy `name` (`default`, `strict`, `always-stale`, `chaos`).
pub fn policy_path(name: &str) -> PathBuf {
    built_dir().join(format!("regcache_policy_{}.wasm", name.replace('-', "_")))
}

/// Bytes of the built policy `name`.
pub fn policy_wasm(name: &str) -> Vec<u8> {
    std::fs::read(policy_path(name)).unwrap_or_else(|e| panic!("read policy {name}: {e}"))
}

/// The built policy `name` as a spec to load, with its operator `config`.
pub fn spec(name: &str, config: &[(&str, &str)]) -> regcache::policy::PolicySpec {
    regcache::policy::PolicySpec {
        wasm: policy_wasm(name).into(),
        source: name.to_string(),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// A language besides Rust that the repository has policies in (`policy/lang/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// JavaScript, through componentize-qjs.
    Js,
    /// Python, through componentize-py.
    Python,
}

impl Lang {
    /// Both, in a fixed order.
    pub const ALL: [Lang; 2] = [Lang::Js, Lang::Python];

    /// The name `regcache policy new --lang` and `policy/lang/` use.
    pub fn name(self) -> &'static str {
        match self {
            Lang::Js => "js",
            Lang::Python => "python",
        }
    }
}

/// Builds the JavaScript or Python policy project in `dir` against the repository's WIT with
/// `regcache policy build` (which installs the project's toolchain into it on first use) and
/// returns the component's path.
pub fn build_lang_policy(dir: &Path) -> PathBuf {
    let output = Command::new(regcache_bin())
        .args(["policy", "build", "--wit"])
        .arg(repo_root().join("wit"))
        .arg(dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run regcache policy build");
    assert!(
        output.status.success(),
        "building the policy {} failed",
        dir.display()
    );
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// Path of the `strict` policy written in `lang` (`policy/lang/<lang>/strict`), built once per
/// test process.
pub fn strict_in(lang: Lang) -> &'static Path {
    static BUILT: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
    BUILT[lang as usize].get_or_init(|| {
        build_lang_policy(
            &repo_root()
                .join("policy/lang")
                .join(lang.name())
                .join("strict"),
        )
    })
}

/// Replays the recording in `file` (JSON lines, as a host writes them) through `policy` with
/// `regcache policy replay`, and asserts each answer is the one the recording says the host's
/// policy decided: a recording replays to what was decided.
pub fn assert_replays_to_what_was_decided(policy: &Path, file: &Path) {
    let (output, _) = crate::binary::run_regcache(
        &[
            "policy",
            "replay",
            policy.to_str().unwrap(),
            "--contexts",
            file.to_str().unwrap(),
        ],
        &[],
        std::time::Duration::from_secs(120),
    );
    assert!(output.status.success(), "{output:?}");
    let recorded = std::fs::read_to_string(file).unwrap();
    let recorded: Vec<serde_json::Value> = recorded
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let replayed: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replayed.len(), recorded.len());
    for (replay, record) in replayed.iter().zip(&recorded) {
        assert_eq!(
            replay["answer"], record["lookup"]["decided"],
            "{replay} / {record}"
        );
    }
}
