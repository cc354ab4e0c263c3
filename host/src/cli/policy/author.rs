//! `regcache policy new` and `build`: a policy author's project. `new` scaffolds a project bound
//! to the WIT that builds as is, in Rust, JavaScript or Python; `build` tells the language from
//! the project's files and compiles it to a component. JavaScript and Python projects keep their
//! own toolchain (`node_modules/`, `.venv/`), installed from the project's pins by the first build
//! and again only when the pins change.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, anyhow, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use regcache::policy::WIT;

/// The languages `new` scaffolds and `build` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A Rust crate (cargo, wasm32-wasip2).
    Rust,
    /// JavaScript (componentize-qjs).
    Js,
    /// Python (componentize-py).
    Python,
}

/// A scaffold's files: the path in the project and the text, where `{{name}}` stands for the
/// project's name. `wit/policy.wit` comes with every one.
type Template = &'static [(&'static str, &'static str)];

const RUST_TEMPLATE: Template = &[
    (
        "Cargo.toml",
        include_str!("../../../templates/policy/Cargo.toml.tmpl"),
    ),
    (
        "src/lib.rs",
        include_str!("../../../templates/policy/src/lib.rs"),
    ),
    (
        ".gitignore",
        include_str!("../../../templates/policy/gitignore"),
    ),
];

const JS_TEMPLATE: Template = &[
    (
        "package.json",
        include_str!("../../../templates/policy-js/package.json.tmpl"),
    ),
    // The `strict` example's lock (policy/lang/js/strict), renamed: `npm ci` installs exactly
    // the packages the repository's tests build with.
    (
        "package-lock.json",
        include_str!("../../../templates/policy-js/package-lock.json.tmpl"),
    ),
    (
        "policy.js",
        include_str!("../../../templates/policy-js/policy.js"),
    ),
    (
        ".gitignore",
        include_str!("../../../templates/policy-js/gitignore"),
    ),
];

const PYTHON_TEMPLATE: Template = &[
    (
        "requirements.txt",
        include_str!("../../../templates/policy-python/requirements.txt"),
    ),
    (
        "app.py",
        include_str!("../../../templates/policy-python/app.py"),
    ),
    (
        ".gitignore",
        include_str!("../../../templates/policy-python/gitignore"),
    ),
];

/// The module componentize-py is given: `app.py` in the project.
const PYTHON_MODULE: &str = "app";

impl Lang {
    fn template(self) -> Template {
        match self {
            Lang::Rust => RUST_TEMPLATE,
            Lang::Js => JS_TEMPLATE,
            Lang::Python => PYTHON_TEMPLATE,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Js => "JavaScript",
            Lang::Python => "Python",
        }
    }

    /// The language of the project in `dir`, from the files only its language's project has.
    fn of_project(dir: &Path) -> anyhow::Result<Lang> {
        let has = |file: &str| dir.join(file).is_file();
        let found: Vec<Lang> = [
            (Lang::Rust, has("Cargo.toml")),
            (Lang::Js, has("package.json")),
            (Lang::Python, has("requirements.txt") && has("app.py")),
        ]
        .into_iter()
        .filter_map(|(lang, found)| found.then_some(lang))
        .collect();
        match found[..] {
            [lang] => Ok(lang),
            [] => bail!(
                "{} is no policy project: it has no Cargo.toml (Rust), package.json (JavaScript) \
                 nor requirements.txt with app.py (Python); create one with `regcache policy new`",
                dir.display()
            ),
            _ => bail!(
                "{} holds the files of several policy projects ({}): keep one language's",
                dir.display(),
                found
                    .iter()
                    .map(|l| l.title())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// The project's name, from its directory's: lowercase ASCII letters, digits and dashes,
/// starting with a letter (a valid cargo and npm name), `my-policy` if nothing is left of it.
fn project_name(dir: &Path) -> String {
    dir.file_name()
        .and_then(|n| n.to_str())
        .map(|n| {
            n.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
                .to_lowercase()
        })
        .filter(|n| n.starts_with(|c: char| c.is_ascii_alphabetic()))
        .unwrap_or_else(|| "my-policy".into())
}

pub fn scaffold(dir: &Path, lang: Lang) -> anyhow::Result<ExitCode> {
    if dir.exists() && dir.read_dir()?.next().is_some() {
        bail!("{} exists and is not empty", dir.display());
    }
    let name = project_name(&std::path::absolute(dir)?);
    let files = lang.template().iter().copied();
    for (path, text) in files.chain([("wit/policy.wit", WIT)]) {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().expect("a file in the project"))?;
        std::fs::write(&path, text.replace("{{name}}", &name))
            .with_context(|| format!("write {}", path.display()))?;
    }
    println!(
        "created the {} policy `{name}` in {}",
        lang.title(),
        dir.display()
    );
    println!("next: regcache policy build {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Builds the project in `dir` and returns the component's path. `wit` is the WIT directory of
/// a JavaScript or Python project (by default its own `wit/`); a Rust crate names its own in
/// `generate!`.
pub fn build(dir: &Path, wit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{} is no policy project", dir.display()))?;
    let lang = Lang::of_project(&dir)?;
    // Builds of one project (tests in parallel, an editor's and a terminal's) would install
    // into the same toolchain and write the same output: one waits for the other.
    let lock = File::open(&dir).with_context(|| format!("open {}", dir.display()))?;
    lock.lock()
        .with_context(|| format!("lock {}", dir.display()))?;
    let componentize: fn(&Path, &Path, &Path) -> anyhow::Result<()> = match lang {
        Lang::Rust if wit.is_some() => {
            bail!("--wit is for JavaScript and Python: a Rust policy names its WIT in `generate!`")
        }
        Lang::Rust => return build_rust(&dir),
        Lang::Js => build_js,
        Lang::Python => build_python,
    };
    let wit = wit.map_or_else(|| dir.join("wit"), Path::to_path_buf);
    // Absolute: the tools run in the project.
    let wit = wit.canonicalize().with_context(|| {
        format!(
            "no WIT at {} (give the WIT directory with --wit)",
            wit.display()
        )
    })?;
    let out_dir = dir.join("target");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join(format!("{}.wasm", project_name(&dir)));
    // Written beside and renamed: a reader never sees half a component.
    let partial = out.with_extension("wasm.partial");
    componentize(&dir, &wit, &partial)?;
    std::fs::rename(&partial, &out)?;
    eprintln!(
        "built {} ({} bytes)",
        out.display(),
        std::fs::metadata(&out)?.len()
    );
    Ok(out)
}

/// Builds with cargo for wasm32-wasip2 and returns the component's path, as cargo reports it.
fn build_rust(dir: &Path) -> anyhow::Result<PathBuf> {
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--message-format=json-render-diagnostics",
        ])
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .stderr(Stdio::inherit())
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

const NODE_INSTALL: &str = "building a JavaScript policy needs Node.js 18 or later and npm \
     (Debian: `apt-get install nodejs npm`)";
const PYTHON_INSTALL: &str = "building a Python policy needs Python 3 with its venv module \
     (Debian: `apt-get install python3 python3-venv`)";

/// Runs `command` in `dir`, naming what to `install` if its program is missing. What it writes
/// goes to stderr: stdout carries only the built component's path.
fn run(command: &mut Command, dir: &Path, install: &str) -> anyhow::Result<()> {
    let program = Path::new(command.get_program()).display().to_string();
    let status = command
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => anyhow!("`{program}` not found: {install}"),
            _ => anyhow!(e).context(format!("run {program}")),
        })?;
    if !status.success() {
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy()).collect();
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Installs a project's toolchain into `home` with `install`, unless it was installed there
/// from the same `pins` (files of the project). The pins' digest is kept in `home` once the
/// install is done, and read after it: an install may write a pin (`npm install`, the lock).
fn ensure_toolchain(
    dir: &Path,
    home: &str,
    pins: &[&str],
    install: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let stamp = dir.join(home).join(".regcache-pins");
    let digest = || -> anyhow::Result<String> {
        let mut hasher = Sha256::new();
        for pin in pins {
            let bytes = match std::fs::read(dir.join(pin)) {
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                read => Some(read.with_context(|| format!("read {pin}"))?),
            };
            hasher.update(format!("{pin}\0{:?}\0", bytes.as_ref().map(Vec::len)));
            hasher.update(bytes.unwrap_or_default());
        }
        Ok(format!("{:x}", hasher.finalize()))
    };
    if std::fs::read_to_string(&stamp).ok() == Some(digest()?) {
        return Ok(());
    }
    eprintln!("installing the toolchain into {}", dir.join(home).display());
    install()?;
    std::fs::write(&stamp, digest()?).with_context(|| format!("write {}", stamp.display()))
}

/// componentize-qjs, installed into `node_modules` by npm, on the module package.json names.
fn build_js(dir: &Path, wit: &Path, out: &Path) -> anyhow::Result<()> {
    #[derive(Deserialize)]
    struct Package {
        main: Option<String>,
    }
    let package: Package = serde_json::from_slice(&std::fs::read(dir.join("package.json"))?)
        .context("read package.json")?;
    let main = package
        .main
        .context("package.json names no module in `main` (the policy's source)")?;
    let locked = dir.join("package-lock.json").exists();
    ensure_toolchain(
        dir,
        "node_modules",
        &["package.json", "package-lock.json"],
        || {
            let npm_command = if locked { "ci" } else { "install" };
            run(
                Command::new("npm").args([
                    npm_command,
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                ]),
                dir,
                NODE_INSTALL,
            )
        },
    )?;
    // Run through node, so that a missing node is named as such. The package's `bin` script is
    // an ES module without the `.mjs` extension, which Node 18 (Debian's) refuses to load as
    // one; the module it imports has the extension.
    run(
        Command::new("node")
            .arg(dir.join("node_modules/componentize-qjs/cli.mjs"))
            // Without it the component needs wasmtime's component-model async, which the host
            // does not enable.
            .arg("--sync")
            .arg("--wit")
            .arg(wit)
            .args(["--world", "policy", "--js"])
            .arg(dir.join(main))
            .arg("--output")
            .arg(out),
        dir,
        NODE_INSTALL,
    )
}

/// componentize-py, installed into `.venv` by pip, on `app.py`.
fn build_python(dir: &Path, wit: &Path, out: &Path) -> anyhow::Result<()> {
    let venv = dir.join(".venv");
    ensure_toolchain(dir, ".venv", &["requirements.txt"], || {
        // Cleared first: a pin removed from requirements.txt leaves no package behind.
        run(
            Command::new("python3")
                .args(["-m", "venv", "--clear"])
                .arg(&venv),
            dir,
            PYTHON_INSTALL,
        )?;
        run(
            Command::new(venv.join("bin/pip")).args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--requirement",
                "requirements.txt",
            ]),
            dir,
            PYTHON_INSTALL,
        )
    })?;
    // componentize-py imports the app to snapshot it, which leaves `__pycache__/` in the
    // project (the scaffold's .gitignore names it).
    run(
        Command::new(venv.join("bin/componentize-py"))
            .arg("--quiet")
            .arg("--wit-path")
            .arg(wit)
            .args(["--world", "policy", "componentize", "--python-path"])
            .arg(dir)
            .arg(PYTHON_MODULE)
            .arg("--output")
            .arg(out),
        dir,
        PYTHON_INSTALL,
    )
}
