//! The sandbox a job's command runs in: bubblewrap (`bwrap`, Debian's `bubblewrap`, the sandbox
//! under Flatpak), so the isolation is a well-kept tool's and not namespace code of our own.
//!
//! What a job gets ([`Sandbox::command`] builds bwrap's arguments; pure, tested below):
//! - **its own PID namespace** (`--unshare-pid`): `/proc` shows its own processes only, it cannot
//!   signal the runner or anything else outside, and when its command ends (exit, timeout,
//!   cancel) bwrap's init ends and the kernel kills every process left in the namespace, however
//!   it left its group (`setsid`, `env -i`, double forks). `--die-with-parent` does the same when
//!   the runner dies.
//! - **its own user, IPC, UTS and cgroup namespaces**, and no capabilities (`--cap-drop ALL`).
//! - **its own mount namespace**: a fresh root in which the system directories ([`SYSTEM_DIRS`],
//!   and the operator's `--ro-bind`s) are read-only, `/dev` (read-only, but for a
//!   [`SHM_BYTES`] `/dev/shm`) and `/tmp` are fresh, and only the
//!   job's checkout, HOME, TMPDIR and the opt-in cache dir are writable, each at the same path as
//!   on the host (so `JETCI_*`, HOME and the working directory read as documented), and `/tmp`
//!   (in memory, [`TMP_BYTES`]). The runner's
//!   work dir (mirrors, `pending/` results, other jobs' workspaces) is not there at all; nor are
//!   `/home`, `/root`, `/var` or `/run`; `/etc/jetci` and the runner's credential files are
//!   covered.
//! - optionally **no network** but loopback (`--unshare-net`): `--network off` on the runner or
//!   `network = false` in the repository's `.jetci.toml`.
//!
//! The job's environment is built by the executor and handed to bwrap as bwrap's own (nothing
//! of the runner's, no NATS settings or credentials); bwrap's command line holds only paths.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the runner looks for bubblewrap (Debian's `bubblewrap` package installs it there).
pub const BWRAP: &str = "/usr/bin/bwrap";

/// System directories a job sees read-only, when they exist (a symlink, as `/bin` -> `usr/bin`
/// on merged-/usr systems, stays a symlink). Everything else of the host is absent.
pub const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
];

/// Paths of the host that stay hidden even though they lie under a [`SYSTEM_DIRS`] entry: the
/// runner's configuration directory of the systemd units (deploy/systemd), which may hold the
/// NATS credentials.
pub const HIDDEN_DIRS: &[&str] = &["/etc/jetci"];

/// The size of a job's `/tmp`, in bytes (it lives in memory; `TMPDIR` is on disk, in the job's
/// workspace).
pub const TMP_BYTES: &str = "536870912";

/// The size of a job's `/dev/shm`, in bytes (in memory; Docker's default size too).
pub const SHM_BYTES: &str = "67108864";

/// How the runner isolates a job (`--sandbox`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// bubblewrap where it works (checked once at start), else `none` with a warning.
    Auto,
    /// bubblewrap, or the runner does not start.
    Bwrap,
    /// No sandbox: the command runs as the runner's user next to the runner's files, in its own
    /// process group only.
    None,
}

/// What the operator decided about every job's sandbox; the paths of one job come with
/// [`Sandbox::command`].
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The bwrap program.
    pub program: PathBuf,
    /// The runner's work dir: covered by an empty directory in every sandbox.
    pub work_dir: PathBuf,
    /// Operator's `--ro-bind SRC[:DEST]` pairs.
    pub ro_binds: Vec<(PathBuf, PathBuf)>,
    /// Files of the runner's configuration (credentials, keys) to cover with an empty file.
    pub hidden_files: Vec<PathBuf>,
    /// Whether jobs have the host's network (`--network on`); a repository may still turn it off.
    pub network: bool,
}

/// The writable places of one job, each bound at its own path.
#[derive(Debug, Clone)]
pub struct JobDirs {
    /// The checkout, and the command's working directory.
    pub checkout: PathBuf,
    pub home: PathBuf,
    pub tmp: PathBuf,
    /// The opt-in cache dir (`--cache-dir`).
    pub cache: Option<PathBuf>,
}

impl Sandbox {
    /// bwrap's arguments for one job, up to and including the `--` before the command. `network`
    /// is false when the job's repository asked for none (the runner's own setting also counts).
    pub fn command(&self, dirs: &JobDirs, network: bool) -> Vec<OsString> {
        self.command_on(dirs, network, &|p| p.exists(), &|p| {
            std::fs::symlink_metadata(p)
                .ok()
                .filter(|m| m.file_type().is_symlink())
                .and_then(|_| std::fs::read_link(p).ok())
        })
    }

    /// [`Sandbox::command`] with the host's file system as functions, for tests.
    fn command_on(
        &self,
        dirs: &JobDirs,
        network: bool,
        exists: &dyn Fn(&Path) -> bool,
        symlink: &dyn Fn(&Path) -> Option<PathBuf>,
    ) -> Vec<OsString> {
        let mut a = Args::default();
        a.push([
            "--die-with-parent",
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--cap-drop",
            "ALL",
            "--hostname",
            "jetci-job",
            // Its own session: no controlling terminal, so no TIOCSTI into the runner's
            // terminal and no ^C to the runner (bwrap(1), --new-session).
            "--new-session",
        ]);
        if !(network && self.network) {
            a.push(["--unshare-net"]);
        }
        for dir in SYSTEM_DIRS.iter().map(Path::new) {
            if let Some(target) = symlink(dir) {
                a.path3("--symlink", &target, dir);
            } else if exists(dir) {
                a.path3("--ro-bind", dir, dir);
            }
        }
        // A fresh /dev holds only the usual devices; its own tmpfs would take up to half the
        // memory, so it is read-only and /dev/shm (POSIX shared memory) a small tmpfs of its own.
        a.push([
            "--dev",
            "/dev",
            "--size",
            SHM_BYTES,
            "--tmpfs",
            "/dev/shm",
            "--remount-ro",
            "/dev",
            "--proc",
            "/proc",
            "--size",
            TMP_BYTES,
            "--tmpfs",
            "/tmp",
        ]);
        for (src, dest) in &self.ro_binds {
            a.path3("--ro-bind", src, dest);
        }
        for dir in HIDDEN_DIRS.iter().map(Path::new) {
            if exists(dir) {
                a.path2("--tmpfs", dir);
            }
        }
        for file in &self.hidden_files {
            if exists(file) {
                a.path3("--ro-bind", Path::new("/dev/null"), file);
            }
        }
        // The work dir goes first, then the job's own places are bound on top of the empty one.
        a.path2("--tmpfs", &self.work_dir);
        for dir in [&dirs.checkout, &dirs.home, &dirs.tmp]
            .into_iter()
            .chain(dirs.cache.as_ref())
        {
            a.path3("--bind", dir, dir);
        }
        // The empty work dir and the root are read-only (both live in memory); the places bound
        // on them stay writable.
        a.path2("--remount-ro", &self.work_dir);
        a.push(["--remount-ro", "/"]);
        a.path2("--chdir", &dirs.checkout);
        a.push(["--"]);
        a.0
    }

    /// Learns whether bwrap works here (installed, user namespaces allowed) by running a trivial
    /// command in the plainest sandbox, then whether a sandbox built like a job's works (in
    /// `<work_dir>/probe`: the operator's `--ro-bind`s may not). Blocking; called once at start.
    ///
    /// Errors: [`ProbeError`], with bwrap's own message when it gave one.
    pub fn probe(&self) -> Result<(), ProbeError> {
        let plain: Vec<OsString> = [
            "--unshare-user",
            "--unshare-pid",
            "--ro-bind",
            "/",
            "/",
            "--proc",
            "/proc",
            "--",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        self.try_run(&plain, "true")
            .map_err(ProbeError::Unavailable)?;
        let base = self.work_dir.join("probe");
        let dirs = JobDirs {
            checkout: base.join("src"),
            home: base.join("home"),
            tmp: base.join("tmp"),
            cache: None,
        };
        for d in [&dirs.checkout, &dirs.home, &dirs.tmp] {
            std::fs::create_dir_all(d)
                .map_err(|e| ProbeError::Setup(format!("cannot create {}: {e}", d.display())))?;
        }
        let tried = self.try_run(
            &self.command(&dirs, true),
            "test -w . && test ! -e ../../pending",
        );
        let _ = std::fs::remove_dir_all(&base);
        tried.map_err(ProbeError::Setup)
    }

    /// Runs `sh -c script` under bwrap with `args`; its failure in one line.
    fn try_run(&self, args: &[OsString], script: &str) -> Result<(), String> {
        let output = Command::new(&self.program)
            .args(args)
            .args(["/bin/sh", "-c", script])
            .env_clear()
            .stdin(Stdio::null())
            .output();
        match output {
            Err(e) => Err(format!("cannot run {}: {e}", self.program.display())),
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => {
                let said = String::from_utf8_lossy(&o.stderr);
                let said = said.trim().lines().last().unwrap_or("");
                Err(format!(
                    "{} failed ({}){}{said}",
                    self.program.display(),
                    o.status,
                    if said.is_empty() { "" } else { ": " }
                ))
            }
        }
    }
}

/// Why [`Sandbox::probe`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// bwrap does not work on this host at all (missing, or no user namespaces).
    #[error("bwrap does not work here ({0})")]
    Unavailable(String),
    /// bwrap works, but not with this runner's settings (an `--ro-bind` it cannot mount, say).
    #[error("a job's sandbox cannot be set up with these settings ({0})")]
    Setup(String),
}

/// Parses `--ro-bind SRC[:DEST]`: DEST is SRC when not given; both absolute.
pub fn parse_ro_bind(arg: &str) -> Result<(PathBuf, PathBuf), String> {
    let (src, dest) = match arg.split_once(':') {
        Some((s, d)) => (PathBuf::from(s), PathBuf::from(d)),
        None => (PathBuf::from(arg), PathBuf::from(arg)),
    };
    let climbs = |p: &Path| p.components().any(|c| c == std::path::Component::ParentDir);
    if !src.is_absolute() || !dest.is_absolute() || climbs(&src) || climbs(&dest) {
        return Err(format!(
            "{arg:?} must be SRC or SRC:DEST, both absolute paths without '..'"
        ));
    }
    Ok((src, dest))
}

/// Refuses an operator's `--ro-bind SRC:DEST` that would undo the sandbox: a SRC that holds
/// the runner's work dir (mirrors, kept results, other jobs' workspaces) or a secret (`secrets`:
/// credential files and dirs such as `/etc/jetci`), or lies inside one, or lies in the host's
/// `/proc` (the runner's environment and command line); a DEST that would cover
/// a job's own places (the work dir, which holds the checkout, HOME and TMPDIR, or the cache
/// dir), or lies inside them, or is `/`. Paths are compared as given: the caller passes them
/// resolved (`std::fs::canonicalize`), so a symlink cannot hide a parent. Pure.
///
/// Errors: one line naming the flag and what it would expose or cover.
pub fn check_ro_bind(
    src: &Path,
    dest: &Path,
    work_dir: &Path,
    cache: Option<&Path>,
    secrets: &[PathBuf],
) -> Result<(), String> {
    let shown = format!("--ro-bind {}:{}", src.display(), dest.display());
    let nested = |a: &Path, b: &Path| a.starts_with(b) || b.starts_with(a);
    if nested(src, work_dir) {
        return Err(format!(
            "{shown} would show jobs the runner's work dir {}",
            work_dir.display()
        ));
    }
    if src.starts_with("/proc") {
        return Err(format!(
            "{shown} would show jobs the host's processes (the runner's environment among them)"
        ));
    }
    if let Some(secret) = secrets.iter().find(|s| nested(src, s)) {
        return Err(format!(
            "{shown} would show jobs the runner's secret {}",
            secret.display()
        ));
    }
    if dest == Path::new("/") {
        return Err(format!("{shown} would cover the whole sandbox"));
    }
    for (place, what) in [(Some(work_dir), "the work dir"), (cache, "the cache dir")] {
        if let Some(place) = place.filter(|p| nested(dest, p)) {
            return Err(format!(
                "{shown} would cover {what} {} (the job's checkout, HOME and TMPDIR live there)",
                place.display()
            ));
        }
    }
    Ok(())
}

/// bwrap's arguments as they are built.
#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push<const N: usize>(&mut self, words: [&str; N]) {
        self.0.extend(words.iter().map(OsString::from));
    }
    fn path2(&mut self, flag: &str, p: &Path) {
        self.0.push(flag.into());
        self.0.push(p.into());
    }
    fn path3(&mut self, flag: &str, a: &Path, b: &Path) {
        self.0.push(flag.into());
        self.0.push(a.into());
        self.0.push(b.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox() -> Sandbox {
        Sandbox {
            program: BWRAP.into(),
            work_dir: "/w/runner-1".into(),
            ro_binds: vec![("/opt/tool".into(), "/tool".into())],
            hidden_files: vec!["/etc/jetci.creds".into(), "/nowhere.creds".into()],
            network: true,
        }
    }

    fn dirs() -> JobDirs {
        JobDirs {
            checkout: "/w/runner-1/jobs/a.1/src".into(),
            home: "/w/runner-1/jobs/a.1/home".into(),
            tmp: "/w/runner-1/jobs/a.1/tmp".into(),
            cache: Some("/cache".into()),
        }
    }

    fn words(s: &Sandbox, network: bool) -> String {
        let exists = |p: &Path| !p.starts_with("/lib32") && !p.starts_with("/nowhere.creds");
        let symlink = |p: &Path| (p == Path::new("/bin")).then(|| PathBuf::from("usr/bin"));
        s.command_on(&dirs(), network, &exists, &symlink)
            .iter()
            .map(|w| w.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn a_job_sees_system_dirs_read_only_and_writes_only_its_own_places() {
        let w = words(&sandbox(), true);
        for part in [
            "--die-with-parent --unshare-user --unshare-pid",
            "--cap-drop ALL",
            "--hostname jetci-job --new-session",
            "--symlink usr/bin /bin",
            "--ro-bind /usr /usr",
            "--ro-bind /etc /etc",
            "--proc /proc",
            "--ro-bind /opt/tool /tool",
            "--tmpfs /etc/jetci",
            "--ro-bind /dev/null /etc/jetci.creds",
            "--tmpfs /w/runner-1 --bind /w/runner-1/jobs/a.1/src /w/runner-1/jobs/a.1/src",
            "--bind /w/runner-1/jobs/a.1/home /w/runner-1/jobs/a.1/home",
            "--bind /cache /cache",
            "--size 536870912 --tmpfs /tmp",
            "--dev /dev --size 67108864 --tmpfs /dev/shm --remount-ro /dev",
            "--remount-ro /w/runner-1 --remount-ro / --chdir /w/runner-1/jobs/a.1/src --",
        ] {
            assert!(w.contains(part), "{part:?} missing in {w}");
        }
        assert!(!w.contains("/lib32"), "{w}");
        assert!(!w.contains("/nowhere.creds"), "{w}");
        assert!(!w.contains("--unshare-net"), "{w}");
        assert!(w.ends_with(" --"), "{w}");
    }

    #[test]
    fn network_off_by_the_runner_or_the_repository() {
        assert!(words(&sandbox(), false).contains("--unshare-net"));
        let mut s = sandbox();
        s.network = false;
        assert!(words(&s, true).contains("--unshare-net"));
    }

    #[test]
    fn ro_bind_flags() {
        assert_eq!(
            parse_ro_bind("/opt/a").unwrap(),
            ("/opt/a".into(), "/opt/a".into())
        );
        assert_eq!(
            parse_ro_bind("/opt/a:/b").unwrap(),
            ("/opt/a".into(), "/b".into())
        );
        assert!(parse_ro_bind("opt").is_err());
        assert!(parse_ro_bind("/a:b").is_err());
        assert!(parse_ro_bind("/opt/../var").is_err());
    }

    #[test]
    fn ro_binds_that_would_expose_the_runner_or_cover_the_job_are_refused() {
        let work = Path::new("/var/lib/jetci/r1");
        let secrets = vec![
            PathBuf::from("/etc/jetci"),
            PathBuf::from("/srv/keys/nats.creds"),
        ];
        let check = |src: &str, dest: &str| {
            check_ro_bind(
                Path::new(src),
                Path::new(dest),
                work,
                Some(Path::new("/cache")),
                &secrets,
            )
        };
        assert_eq!(check("/opt/tool", "/opt/tool"), Ok(()));
        assert_eq!(check("/srv/keys/other", "/k"), Ok(()));
        for (src, dest, why) in [
            ("/var/lib", "/x", "work dir"),
            ("/", "/host", "work dir"),
            ("/var/lib/jetci/r1/mirrors", "/m", "work dir"),
            ("/proc/1", "/p", "host's processes"),
            ("/etc", "/host-etc", "secret /etc/jetci"),
            ("/etc/jetci/sub", "/s", "secret /etc/jetci"),
            ("/srv/keys", "/k", "secret /srv/keys/nats.creds"),
            ("/srv/keys/nats.creds", "/k", "secret"),
            ("/opt/tool", "/", "whole sandbox"),
            ("/opt/tool", "/var", "cover the work dir"),
            ("/opt/tool", "/var/lib/jetci/r1/jobs", "cover the work dir"),
            ("/opt/tool", "/cache/x", "cover the cache dir"),
        ] {
            let e = check(src, dest).expect_err(src);
            assert!(e.contains(why), "{src}:{dest}: {e}");
            assert!(
                e.starts_with(&format!("--ro-bind {src}:{dest} would")),
                "{e}"
            );
        }
    }
}
