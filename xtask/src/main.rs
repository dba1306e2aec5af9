//! `cargo xtask`: the project's own tasks. `install` puts devmgrd, devctl,
//! their systemd unit, D-Bus and polkit files, man pages, completions and
//! the Cockpit page where a Linux system looks for them, under `DESTDIR`
//! and `PREFIX` as a package build expects (docs/install.md); `uninstall`
//! takes them away; `cockpit` builds the Cockpit page's styles
//! (docs/cockpit.md).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "devmgr's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build devmgrd and devctl (release) and install them with the systemd
    /// unit, the D-Bus activation, policy and interface files, the polkit
    /// actions, the man pages, the bash/zsh/fish completions and, unless
    /// one exists, /etc/devmgr/devmgrd.toml.
    Install(Options),
    /// Remove what `install` put there (never the configuration file, nor
    /// the state in /var/lib/devmgr).
    Uninstall(Options),
    /// Build the Cockpit page (data/cockpit/devmgr) where it is: `npm ci`
    /// of the pinned PatternFly when package-lock.json changed, then
    /// build.mjs writes devmgr/vendor/. `install` does this itself.
    Cockpit,
}

/// Where to install, from the options, else the environment variables of
/// the same name (as `make install` takes them; empty means unset), else
/// the defaults.
#[derive(clap::Args)]
struct Options {
    /// Staging root that every path is put under (a package build's
    /// image); the installed files still name paths without it [env:
    /// DESTDIR; default: none].
    #[arg(long, value_name = "DIR")]
    destdir: Option<PathBuf>,
    /// Installation prefix: binaries in PREFIX/bin and PREFIX/sbin, data
    /// under PREFIX/share and PREFIX/lib. dbus-daemon and polkit read only
    /// /usr/share (and /etc): a system install uses --prefix /usr [env:
    /// PREFIX; default: /usr/local].
    #[arg(long, value_name = "DIR")]
    prefix: Option<PathBuf>,
    /// Where devmgrd.toml goes (as devmgr/devmgrd.toml). devmgrd reads
    /// /etc/devmgr/devmgrd.toml: change this only to stage or test [env:
    /// SYSCONFDIR; default: /etc].
    #[arg(long, value_name = "DIR")]
    sysconfdir: Option<PathBuf>,
    /// Take devmgrd and devctl from DIR instead of building them.
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
}

/// The resolved [`Options`].
struct Where {
    destdir: Option<PathBuf>,
    prefix: PathBuf,
    sysconfdir: PathBuf,
    bin_dir: Option<PathBuf>,
}

impl Options {
    fn resolve(self) -> Where {
        let env = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Where {
            destdir: self.destdir.or_else(|| env("DESTDIR")),
            prefix: self
                .prefix
                .or_else(|| env("PREFIX"))
                .unwrap_or_else(|| PathBuf::from("/usr/local")),
            sysconfdir: self
                .sysconfdir
                .or_else(|| env("SYSCONFDIR"))
                .unwrap_or_else(|| PathBuf::from("/etc")),
            bin_dir: self.bin_dir,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Install(options) => install(&options.resolve()),
        Task::Uninstall(options) => uninstall(&options.resolve()),
        Task::Cockpit => cockpit_page().map(|dir| println!("built {}", dir.display())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where a file's bytes come from.
enum Source {
    /// A built binary (devmgrd, devctl).
    Binary(&'static str),
    /// A file of data/, as it is.
    Data(&'static str),
    /// A file of data/ with `@sbindir@` filled in.
    Template(&'static str),
    /// What a built binary prints with these arguments (man pages,
    /// completions).
    Generated(&'static str, [&'static str; 2]),
    /// A file of the built Cockpit page (data/cockpit/devmgr/…).
    Cockpit(PathBuf),
}

/// One file to install: where it goes on the target system (absolute,
/// without DESTDIR), its mode and where its bytes come from.
struct Entry {
    path: PathBuf,
    mode: u32,
    source: Source,
    /// An administrator's file: installed only where none exists, never
    /// removed.
    config: bool,
}

/// The workspace's root (xtask/..).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where the Cockpit page goes: Cockpit reads packages from
/// share/cockpit/<name>/.
fn cockpit_dir(at: &Where) -> PathBuf {
    at.prefix.join("share/cockpit/devmgr")
}

/// Every file `install` puts in place; with `cockpit`, the built Cockpit
/// page's files too.
fn layout(at: &Where, cockpit: Option<&Path>) -> Result<Vec<Entry>, String> {
    let prefix = &at.prefix;
    for dir in [prefix, &at.sysconfdir] {
        if !dir.is_absolute() {
            return Err(format!("{} is not an absolute path", dir.display()));
        }
    }
    let share = prefix.join("share");
    let file = |path: PathBuf, mode: u32, source: Source| Entry {
        path,
        mode,
        source,
        config: false,
    };
    let mut entries = vec![
        file(
            prefix.join("sbin/devmgrd"),
            0o755,
            Source::Binary("devmgrd"),
        ),
        file(prefix.join("bin/devctl"), 0o755, Source::Binary("devctl")),
        file(
            prefix.join("lib/systemd/system/devmgrd.service"),
            0o644,
            Source::Template("devmgrd.service.in"),
        ),
        file(
            share.join("dbus-1/system-services/org.devmgr.DevMgr1.service"),
            0o644,
            Source::Template("org.devmgr.DevMgr1.service.in"),
        ),
        file(
            share.join("dbus-1/system.d/org.devmgr.DevMgr1.conf"),
            0o644,
            Source::Data("org.devmgr.DevMgr1.conf"),
        ),
        file(
            share.join("dbus-1/interfaces/org.devmgr.DevMgr1.xml"),
            0o644,
            Source::Data("org.devmgr.DevMgr1.xml"),
        ),
        file(
            share.join("polkit-1/actions/org.devmgr.DevMgr1.policy"),
            0o644,
            Source::Data("org.devmgr.DevMgr1.policy"),
        ),
        file(
            share.join("man/man8/devmgrd.8"),
            0o644,
            Source::Generated("devmgrd", ["--generate", "man"]),
        ),
        file(
            share.join("man/man1/devctl.1"),
            0o644,
            Source::Generated("devctl", ["manpage", ""]),
        ),
    ];
    for (tool, verb) in [("devmgrd", "--generate"), ("devctl", "completions")] {
        for (shell, path) in [
            ("bash", format!("bash-completion/completions/{tool}")),
            ("zsh", format!("zsh/site-functions/_{tool}")),
            ("fish", format!("fish/vendor_completions.d/{tool}.fish")),
        ] {
            let source = Source::Generated(tool, [verb, shell]);
            entries.push(file(share.join(path), 0o644, source));
        }
    }
    if let Some(page) = cockpit {
        for relative in files_under(page)? {
            let path = cockpit_dir(at).join(&relative);
            entries.push(file(path, 0o644, Source::Cockpit(relative)));
        }
    }
    // devmgrd reads /etc/devmgr/devmgrd.toml whatever the prefix.
    entries.push(Entry {
        path: at.sysconfdir.join("devmgr/devmgrd.toml"),
        mode: 0o644,
        source: Source::Data("devmgrd.toml"),
        config: true,
    });
    Ok(entries)
}

/// Every file's bytes, made in memory first: a failure to read or generate
/// anything installs nothing.
fn contents(
    entries: &[Entry],
    prefix: &Path,
    bin_dir: &Path,
    cockpit: Option<&Path>,
) -> Result<Vec<Vec<u8>>, String> {
    let data = root().join("data");
    let read = |name: &str| {
        std::fs::read(data.join(name)).map_err(|e| format!("cannot read data/{name}: {e}"))
    };
    let sbindir = prefix.join("sbin");
    entries
        .iter()
        .map(|entry| match &entry.source {
            Source::Binary(name) => std::fs::read(bin_dir.join(name))
                .map_err(|e| format!("cannot read {}: {e}", bin_dir.join(name).display())),
            Source::Data(name) => read(name),
            Source::Template(name) => {
                let text = String::from_utf8(read(name)?)
                    .map_err(|_| format!("data/{name} is not UTF-8"))?;
                let filled = text.replace("@sbindir@", &sbindir.to_string_lossy());
                if let Some(left) = placeholder(&filled) {
                    return Err(format!("data/{name}: xtask does not fill in {left}"));
                }
                Ok(filled.into_bytes())
            }
            Source::Generated(tool, args) => {
                let args: Vec<&str> = args.iter().copied().filter(|a| !a.is_empty()).collect();
                generated(&bin_dir.join(tool), &args)
            }
            Source::Cockpit(relative) => {
                let path = cockpit.unwrap_or(Path::new(".")).join(relative);
                std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
            }
        })
        .collect()
}

/// The first `@word@` left in `text`, if any.
fn placeholder(text: &str) -> Option<&str> {
    text.match_indices('@').find_map(|(at, _)| {
        let rest = &text[at + 1..];
        let end = rest.find(|c: char| !(c.is_ascii_lowercase() || c == '_'))?;
        (end > 0 && rest[end..].starts_with('@')).then(|| &text[at..at + end + 2])
    })
}

/// What `program args` prints, which must be something.
fn generated(program: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    let what = format!("{} {}", program.display(), args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// `path` under `destdir`, if any.
fn staged(destdir: Option<&Path>, path: &Path) -> PathBuf {
    match destdir {
        None => path.to_owned(),
        Some(destdir) => destdir.join(path.strip_prefix("/").unwrap_or(path)),
    }
}

/// Builds the binaries unless `--bin-dir` names them; returns their dir.
fn binaries(at: &Where) -> Result<PathBuf, String> {
    if let Some(dir) = &at.bin_dir {
        return Ok(dir.clone());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root())
        .args([
            "build",
            "--release",
            "--package",
            "devmgrd",
            "--package",
            "devctl",
        ])
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build failed ({status})"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    Ok(target.join("release"))
}

fn install(at: &Where) -> Result<(), String> {
    let page = cockpit_page()?;
    let entries = layout(at, Some(&page))?;
    let contents = contents(&entries, &at.prefix, &binaries(at)?, Some(&page))?;
    // A file an older page had and this one has not would be served still.
    let installed_page = staged(at.destdir.as_deref(), &cockpit_dir(at));
    if installed_page.exists() {
        std::fs::remove_dir_all(&installed_page)
            .map_err(|e| format!("cannot replace {}: {e}", installed_page.display()))?;
    }
    for (entry, content) in entries.iter().zip(&contents) {
        let path = staged(at.destdir.as_deref(), &entry.path);
        if entry.config && path.exists() {
            println!("kept      {} (it exists)", path.display());
            continue;
        }
        write(&path, content, entry.mode)?;
        println!("installed {}", path.display());
    }
    if at.destdir.is_none() {
        println!("\nNext: systemctl daemon-reload && systemctl enable --now devmgrd");
        if at.prefix != Path::new("/usr") {
            println!(
                "(dbus-daemon and polkit read only /usr/share and /etc: with this prefix \
                 the bus policy and the polkit actions are not found; a system service \
                 is installed with --prefix /usr)"
            );
        }
    }
    Ok(())
}

/// Writes `entry` at `path` through a temporary file and a rename, so that
/// a running devmgrd's binary is replaced, not rewritten under it.
fn write(path: &Path, content: &[u8], mode: u32) -> Result<(), String> {
    let dir = path
        .parent()
        .ok_or_else(|| format!("{} has no directory", path.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{name}.xtask-new"));
    let result = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(content)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        format!("cannot install {}: {e}", path.display())
    })
}

fn uninstall(at: &Where) -> Result<(), String> {
    let page = staged(at.destdir.as_deref(), &cockpit_dir(at));
    match std::fs::remove_dir_all(&page) {
        Ok(()) => println!("removed   {}", page.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", page.display())),
    }
    for entry in layout(at, None)?.iter().filter(|e| !e.config) {
        let path = staged(at.destdir.as_deref(), &entry.path);
        match std::fs::remove_file(&path) {
            Ok(()) => println!("removed   {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove {}: {e}", path.display())),
        }
    }
    Ok(())
}

/// Every file under `dir`, relative to it, sorted (a stable install order).
fn files_under(dir: &Path) -> Result<Vec<PathBuf>, String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
        let entries =
            std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry
                .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
                .path();
            if path.is_dir() {
                walk(&path, root, out)?;
            } else if let Ok(relative) = path.strip_prefix(root) {
                out.push(relative.to_path_buf());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Builds the Cockpit page in data/cockpit/devmgr and returns that
/// directory: `npm ci` (the pinned PatternFly of package-lock.json) unless
/// node_modules already holds exactly that lockfile's packages, then
/// `node build.mjs`, which writes devmgr/vendor/ (docs/cockpit.md).
fn cockpit_page() -> Result<PathBuf, String> {
    let dir = root().join("data/cockpit");
    // One build at a time (the install tests run several xtasks at once):
    // npm ci starts by deleting node_modules. build.mjs leaves an
    // up-to-date vendor/ untouched, so what one xtask read stays as it was
    // while the next one builds.
    let guard = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".build-lock"))
        .map_err(|e| format!("cannot open data/cockpit/.build-lock: {e}"))?;
    guard
        .lock()
        .map_err(|e| format!("cannot lock data/cockpit/.build-lock: {e}"))?;
    let lock = std::fs::read(dir.join("package-lock.json"))
        .map_err(|e| format!("cannot read data/cockpit/package-lock.json: {e}"))?;
    // npm ci starts by deleting node_modules: skip it when the copy of the
    // lockfile it was made from is the current one.
    let stamp = dir.join("node_modules/.devmgr-package-lock.json");
    if std::fs::read(&stamp).ok().as_deref() != Some(lock.as_slice()) {
        run_in(
            &dir,
            "npm",
            &["ci", "--no-audit", "--no-fund", "--ignore-scripts"],
        )?;
        std::fs::write(&stamp, &lock)
            .map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
    }
    run_in(&dir, "node", &["build.mjs"])?;
    Ok(dir.join("devmgr"))
}

/// Runs `program args` in `dir`, which must succeed.
fn run_in(dir: &Path, program: &str, args: &[&str]) -> Result<(), String> {
    let what = format!("{program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .status()
        .map_err(|e| {
            format!(
                "cannot run {what} in {}: {e} (the Cockpit page is built with Node.js and npm)",
                dir.display()
            )
        })?;
    if !status.success() {
        return Err(format!("{what} in {} failed ({status})", dir.display()));
    }
    Ok(())
}
