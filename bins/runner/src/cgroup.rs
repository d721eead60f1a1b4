//! A pids cgroup per job, where the kernel lets the runner make one: the kernel then refuses a
//! job's fork past `--max-procs` itself (`pids.max`), whoever runs the runner, root included
//! (`RLIMIT_NPROC`, the other kernel bound, does not hold for root).
//!
//! This is the kernel's file interface (Documentation/admin-guide/cgroup-v2.rst, "PID";
//! cgroup-v1/pids.rst), not namespace code: a directory per job in the runner's own cgroup of
//! the pids hierarchy (removed when the job's processes are gone), `pids.max` written, and the job's first process moved in by writing `0`
//! (itself) to its `cgroup.procs` before it becomes bwrap, so everything the job starts is
//! counted. It works with cgroup v1's pids controller (where root may make cgroups) and with
//! cgroup v2 where the runner's cgroup hands the pids controller down (a delegated subtree, or
//! the root cgroup). Elsewhere [`PidsParent::find`] finds nothing and the runner keeps its count
//! of the job's processes ([`crate::exec`]).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where the runner makes its jobs' pids cgroups: `<its own pids cgroup>/jetci-<owner>-<job>`,
/// beside nothing else of its own, so nothing is left behind once its jobs are gone.
#[derive(Debug, Clone)]
pub struct PidsParent {
    dir: PathBuf,
    /// `jetci-<owner>-`: the start of every job cgroup's name.
    prefix: String,
}

impl PidsParent {
    /// Finds the runner's own cgroup in the pids hierarchy and checks that a job's cgroup made
    /// there gets `pids.max`; removes the (empty) job cgroups a previous life of this runner
    /// left. `None` where that cannot be done (no pids controller, not allowed to write,
    /// cgroup v2 whose runner's cgroup does not hand the pids controller down).
    pub fn find(owner: &str) -> Option<PidsParent> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let parent = PidsParent {
            dir: own_pids_cgroup(&mountinfo, &cgroup)?,
            prefix: format!("jetci-{owner}-"),
        };
        if let Ok(dir) = std::fs::read_dir(&parent.dir) {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&parent.prefix) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let works = parent.job("probe", 16).is_ok_and(|probe| {
            let works = probe.dir.join("pids.max").exists();
            probe.remove();
            works
        });
        works.then_some(parent)
    }

    /// Makes the cgroup of one job, `name`, allowing at most `max` processes and threads.
    pub fn job(&self, name: &str, max: u32) -> io::Result<JobCgroup> {
        let dir = self.dir.join(format!("{}{name}", self.prefix));
        std::fs::create_dir(&dir)?;
        let cgroup = JobCgroup {
            procs: CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                .map_err(io::Error::other)?,
            dir,
        };
        if let Err(e) = std::fs::write(cgroup.dir.join("pids.max"), max.to_string()) {
            cgroup.remove();
            return Err(e);
        }
        Ok(cgroup)
    }
}

/// One job's pids cgroup; removed by [`JobCgroup::remove`] once its processes are gone.
#[derive(Debug)]
pub struct JobCgroup {
    dir: PathBuf,
    /// `<dir>/cgroup.procs`, ready for [`JobCgroup::enter`] (which may not allocate).
    procs: CString,
}

impl JobCgroup {
    /// A function that moves the calling process into the cgroup, for `pre_exec`: it only opens
    /// and writes a file (async-signal-safe, no allocation), so it can run between fork and exec.
    pub fn enter(&self) -> impl FnMut() -> io::Result<()> + Send + Sync + 'static {
        let procs = self.procs.clone();
        move || {
            use nix::fcntl::{open, OFlag};
            let fd = open(
                procs.as_c_str(),
                OFlag::O_WRONLY,
                nix::sys::stat::Mode::empty(),
            )?;
            nix::unistd::write(&fd, b"0")?;
            Ok(())
        }
    }

    /// How many processes and threads are in it now.
    pub fn current(&self) -> Option<u64> {
        read_number(&self.dir.join("pids.current"), None)
    }

    /// How many forks the kernel refused for `pids.max` so far.
    pub fn refused(&self) -> u64 {
        read_number(&self.dir.join("pids.events"), Some("max")).unwrap_or(0)
    }

    /// Removes the cgroup once the kernel has reaped its last process (it cannot be removed
    /// before), trying for a few seconds; blocking.
    pub fn remove(self) {
        for _ in 0..500 {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        tracing::warn!(cgroup = %self.dir.display(), "cannot remove a job's pids cgroup");
    }
}

/// The number in `file`, or on its line that starts with `key` (`max 3` in `pids.events`).
fn read_number(file: &Path, key: Option<&str>) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = match key {
        None => text.lines().next()?,
        Some(key) => text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))?,
    };
    line.trim().parse().ok()
}

/// The directory of this process's cgroup in the pids hierarchy, from `/proc/self/mountinfo`
/// and `/proc/self/cgroup` (proc(5)): cgroup v1's `pids` controller when one is mounted, else
/// the cgroup v2 hierarchy. Pure.
fn own_pids_cgroup(mountinfo: &str, cgroup: &str) -> Option<PathBuf> {
    // mountinfo: `id parent major:minor root mount-point options... - fstype source super-options`
    let mounts: Vec<(&str, &str, &str, &str)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some((
                *left.get(3)?,
                *left.get(4)?,
                *right.first()?,
                *right.get(2)?,
            ))
        })
        .collect();
    let v1 = mounts
        .iter()
        .find(|(_, _, fs, opts)| *fs == "cgroup" && opts.split(',').any(|o| o == "pids"));
    let (root, mount, path) = match v1 {
        Some((root, mount, _, _)) => {
            let path = cgroup.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers.split(',').any(|c| c == "pids").then_some(path)
            })?;
            (*root, *mount, path)
        }
        None => {
            let (root, mount, _, _) = mounts.iter().find(|(_, _, fs, _)| *fs == "cgroup2")?;
            let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
            (*root, *mount, path)
        }
    };
    let path = path.strip_prefix(root).unwrap_or(path);
    Some(Path::new(mount).join(path.trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS_V1: &str = "\
35 24 0:30 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 35 0:35 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
44 35 0:39 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
46 35 0:41 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn the_runners_own_pids_cgroup() {
        let cgroup = "8:pids:/build\n4:memory:/api/e29\n0::/\n";
        assert_eq!(
            own_pids_cgroup(MOUNTS_V1, cgroup),
            Some(PathBuf::from("/sys/fs/cgroup/pids/build"))
        );
        let v2 = "30 24 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            own_pids_cgroup(v2, "0::/system.slice/jetci-runner@1.service\n"),
            Some(PathBuf::from(
                "/sys/fs/cgroup/system.slice/jetci-runner@1.service"
            ))
        );
        assert_eq!(own_pids_cgroup("", "0::/\n"), None);
    }

    #[test]
    fn numbers_from_cgroup_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("events"), "max 7\n").unwrap();
        std::fs::write(dir.path().join("current"), "12\n").unwrap();
        assert_eq!(
            read_number(&dir.path().join("events"), Some("max")),
            Some(7)
        );
        assert_eq!(read_number(&dir.path().join("current"), None), Some(12));
        assert_eq!(read_number(&dir.path().join("none"), None), None);
    }
}
