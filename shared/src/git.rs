//! Repository access with git2; jetci runs no `git` binary.
//!
//! The observer opens the watched repository ([`Watched`]): a local path directly, a URL through
//! a bare mirror it fetches on every poll. The runner keeps one bare [`Mirror`] per repository,
//! fetched only when a job's commit is missing, and checks each job's commit out of it into a
//! fresh directory (libgit2's checkout `target_directory`), so a job costs one checkout, not a
//! clone. Submodules are checked out the same way, each from its own mirror beside the others
//! ([`Mirror::checkout`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use git2::{build::CheckoutBuilder, FetchOptions, ObjectType, Oid, Repository, Sort};

use crate::subjects::repo_slug;

/// A git operation failed; the message says which and on what.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{context}: {message}")]
pub struct GitError {
    pub context: String,
    pub message: String,
}

/// Why [`Mirror::checkout`] failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CheckoutError {
    /// Reading, fetching or writing failed: another attempt (maybe on another runner) may work.
    #[error(transparent)]
    Failed(#[from] GitError),
    /// The commit asks for something the runner refuses to do for it (a submodule URL on the
    /// runner's own disk, [`check_submodule_url`]): every attempt would be refused the same way.
    #[error(transparent)]
    Refused(GitError),
}

/// The most characters of a libgit2 message kept: it may quote a ref name of any length.
const MAX_GIT_MESSAGE: usize = 1000;

fn err(context: impl Into<String>) -> impl FnOnce(git2::Error) -> GitError {
    let context = context.into();
    move |e| GitError {
        context,
        message: crate::limits::clip(e.message(), MAX_GIT_MESSAGE),
    }
}

/// True when `spec` names a remote repository rather than a local path: `scheme://...` or the
/// scp-like `user@host:path`.
pub fn is_url(spec: &str) -> bool {
    if spec.contains("://") {
        return true;
    }
    match (spec.find('@'), spec.find(':')) {
        (Some(at), Some(colon)) => at < colon && !spec[..colon].contains('/'),
        _ => false,
    }
}

/// A user name and password (or token) for fetching over HTTP(S).
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Login({:?}, <password>)", self.user)
    }
}

/// Splits the credentials off a repository URL: `http://user:token@host/repo.git` gives
/// `http://host/repo.git` (what jetci shows, publishes and stores) and the login it fetches with.
/// A URL without a password, a local path and the scp-like `git@host:path` come back unchanged
/// (a user name alone is no secret). Percent-escapes in the user and password are decoded.
pub fn split_credentials(spec: &str) -> (String, Option<Login>) {
    let Some((scheme, rest)) = spec.split_once("://") else {
        return (spec.to_string(), None);
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (spec.to_string(), None);
    };
    let shown = format!("{scheme}://{}", &rest[at + 1..]);
    let (user, password) = match rest[..at].split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (&rest[..at], None),
    };
    let password = password.map(percent_decode).unwrap_or_default();
    if password.is_empty() {
        // Nothing secret: keep the user name, which may choose the account.
        return (format!("{scheme}://{}@{}", user, &rest[at + 1..]), None);
    }
    let login = Login {
        user: percent_decode(user),
        password,
    };
    (shown, Some(login))
}

/// `%41` → `A`; anything that is not a valid escape stays as it is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The logins a runner fetches with, from a file in the format of git's credential store
/// (`~/.git-credentials`): one URL with credentials a line, `https://user:token@host[/path]`.
/// A repository URL uses the line with the same scheme and host (and port) whose path is a prefix
/// of its path, the longest such path first. Blank lines and lines starting with `#` are skipped.
#[derive(Clone, Debug, Default)]
pub struct CredentialStore {
    /// `(scheme://host[:port], path prefix, login)`.
    entries: Vec<(String, String, Login)>,
}

/// Longest credentials file read, in bytes (invariant I5: bound every size a user gives).
pub const MAX_CREDENTIALS_FILE: u64 = 1024 * 1024;

impl CredentialStore {
    /// Reads `path`. Errors: the file cannot be read, is larger than [`MAX_CREDENTIALS_FILE`],
    /// or a line is not a URL with a user and password (the error names the line, not its text).
    pub fn load(path: &Path) -> Result<CredentialStore, GitError> {
        let fail = |message: String| GitError {
            context: format!("cannot read the credentials file {}", path.display()),
            message,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| fail(e.to_string()))?
            .len();
        if len > MAX_CREDENTIALS_FILE {
            return Err(fail(format!("larger than {MAX_CREDENTIALS_FILE} bytes")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        CredentialStore::parse(&text).map_err(fail)
    }

    /// Parses the text of a credentials file (see [`CredentialStore`]).
    pub fn parse(text: &str) -> Result<CredentialStore, String> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (shown, login) = split_credentials(line);
            let (Some(login), Some((origin, path))) = (login, split_origin(&shown)) else {
                return Err(format!(
                    "line {} is not a URL with a user and a password",
                    n + 1
                ));
            };
            entries.push((origin, path, login));
        }
        entries.sort_by_key(|(_, path, _)| std::cmp::Reverse(path.len()));
        Ok(CredentialStore { entries })
    }

    /// The login for repository `url`, if a line covers it.
    pub fn login_for(&self, url: &str) -> Option<&Login> {
        let (origin, path) = split_origin(&split_credentials(url).0)?;
        self.entries
            .iter()
            .find(|(o, p, _)| *o == origin && path.starts_with(p.trim_end_matches('/')))
            .map(|(_, _, login)| login)
    }
}

/// `scheme://host[:port]` and the path of a URL (lowercased scheme and host).
fn split_origin(url: &str) -> Option<(String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find('/').unwrap_or(rest.len());
    let origin = format!("{}://{}", scheme, &rest[..end]).to_lowercase();
    Some((origin, rest[end..].to_string()))
}

/// The logins this process fetches with when a URL carries none (the runner's
/// `--git-credentials`); set once at start.
static CREDENTIALS: std::sync::OnceLock<CredentialStore> = std::sync::OnceLock::new();

/// Makes every fetch of this process use `store` for URLs that carry no credentials. Call once,
/// at start; a second call is ignored.
pub fn use_credentials(store: CredentialStore) {
    let _ = CREDENTIALS.set(store);
}

/// A short stable hash of any text (git's blob id), for keys and directory names derived from
/// free text such as branch names and URLs.
pub fn text_hash(text: &str) -> String {
    bytes_hash(text.as_bytes())
}

/// [`text_hash`] of raw bytes: 16 lowercase hex digits.
pub fn bytes_hash(bytes: &[u8]) -> String {
    Oid::hash_object(ObjectType::Blob, bytes)
        .map(|o| o.to_string()[..16].to_string())
        .unwrap_or_else(|_| "0".repeat(16))
}

/// A branch's name as git stores it, without `refs/heads/`: bytes, which git does not require to
/// be UTF-8 (`refs/heads/lat\xe9n1` is a valid branch).
///
/// The bytes are the branch's identity (its mark in `ci-observer` is keyed by them, so two names
/// that differ only in bytes that are not UTF-8 never share a mark); [`BranchName::text`] is what
/// people and messages see, with U+FFFD for each byte sequence that is not UTF-8.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BranchName(Vec<u8>);

impl BranchName {
    /// The name from git's bytes.
    pub fn from_bytes(bytes: &[u8]) -> BranchName {
        BranchName(bytes.to_vec())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The name as text; bytes that are not UTF-8 become U+FFFD.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// True when the name is UTF-8 (so [`BranchName::text`] is exact).
    pub fn is_utf8(&self) -> bool {
        std::str::from_utf8(&self.0).is_ok()
    }
}

impl From<&str> for BranchName {
    fn from(name: &str) -> BranchName {
        BranchName(name.as_bytes().to_vec())
    }
}

impl std::fmt::Display for BranchName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl std::fmt::Debug for BranchName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

/// A set of commits in topological order, from [`Watched::new_history`].
#[derive(Debug, Default)]
pub struct History {
    /// The commits, parents before children.
    pub commits: Vec<Oid>,
    /// Each commit's position in `commits`.
    pub index: HashMap<Oid, usize>,
    /// For each position in `commits`, the positions of its parents that are in the set.
    pub parents: Vec<Vec<usize>>,
    /// For each position in `commits`, the position of its first parent when that parent is in
    /// the set (a merge's first parent is the branch it was made on).
    pub first_parent: Vec<Option<usize>>,
}

/// The bits of a commit that travel with it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommitInfo {
    /// `Name <email>`.
    pub author: String,
    /// First line of the message.
    pub summary: String,
}

/// The repository an observer watches.
pub struct Watched {
    repo: Repository,
    /// What runners fetch from: the URL without its credentials, or the canonical local path.
    pub url: String,
    /// The credentials the URL came with: used to fetch, never shown or published.
    login: Option<Login>,
    remote: bool,
}

impl Watched {
    /// Opens a local repository (bare or not) or mirrors a URL under `mirror_root`.
    ///
    /// Errors: the path is not a git repository; the URL cannot be fetched.
    pub fn open(spec: &str, mirror_root: &Path) -> Result<Watched, GitError> {
        if is_url(spec) {
            let (url, login) = split_credentials(spec);
            let path = mirror_root.join(format!("{}-{}.git", repo_slug(&url), text_hash(&url)));
            let repo = open_or_init_bare(&path)?;
            let w = Watched {
                repo,
                url,
                login,
                remote: true,
            };
            w.refresh()?;
            Ok(w)
        } else {
            let path = std::fs::canonicalize(spec).map_err(|e| GitError {
                context: format!("cannot open repository {spec}"),
                message: e.to_string(),
            })?;
            let repo =
                Repository::open(&path).map_err(err(format!("cannot open repository {spec}")))?;
            Ok(Watched {
                repo,
                url: path.to_string_lossy().into_owned(),
                login: None,
                remote: false,
            })
        }
    }

    /// Brings a mirrored URL up to date (all branches, pruning deleted ones); a no-op for a
    /// local repository, which git2 reads fresh on every call.
    pub fn refresh(&self) -> Result<(), GitError> {
        if self.remote {
            fetch_all(
                &self.repo,
                &self.url,
                self.login.as_ref(),
                CREDENTIALS.get(),
                true,
            )?;
        }
        Ok(())
    }

    /// Every branch (`refs/heads/*`) and its head commit, sorted by name (bytes). A name need not
    /// be UTF-8 ([`BranchName`]); a branch whose head is not a commit is skipped.
    pub fn branches(&self) -> Result<Vec<(BranchName, Oid)>, GitError> {
        let mut out = Vec::new();
        let refs = self
            .repo
            .references_glob("refs/heads/*")
            .map_err(err("cannot list branches"))?;
        for r in refs {
            let r = r.map_err(err("cannot read a branch"))?;
            let Some(name) = r.name_bytes().strip_prefix(b"refs/heads/") else {
                continue;
            };
            let Ok(commit) = r.peel_to_commit() else {
                continue;
            };
            out.push((BranchName::from_bytes(name), commit.id()));
        }
        out.sort();
        Ok(out)
    }

    /// The branch the repository's `HEAD` names: the checked-out branch of a working repository,
    /// the default branch of a bare one. `None` when `HEAD` is detached or names no branch. For a
    /// mirrored URL this is the mirror's own `HEAD`, which fetching does not move. The observer
    /// handles this branch first, so a commit on several branches is attributed to it.
    pub fn head_branch(&self) -> Option<BranchName> {
        let head = self.repo.find_reference("HEAD").ok()?;
        let target = head.symbolic_target_bytes()?;
        target
            .strip_prefix(b"refs/heads/")
            .map(BranchName::from_bytes)
    }

    /// Every commit reachable from one of `heads` but from none of `hidden`, parents before
    /// children, with the parents of each that are in the set too. Ids in `hidden` that no longer
    /// exist are ignored (a mark left by a force-push may have been garbage collected).
    ///
    /// One history walk for all heads: its cost grows with the commits it returns and the
    /// number of heads and hidden ids, not with their product (a walk per branch, each hiding
    /// every other branch's mark, took minutes with 10,000 branches).
    pub fn new_history(&self, heads: &[Oid], hidden: &[Oid]) -> Result<History, GitError> {
        let mut walk = self.repo.revwalk().map_err(err("cannot walk history"))?;
        walk.set_sorting(Sort::TOPOLOGICAL | Sort::REVERSE)
            .map_err(err("cannot walk history"))?;
        for head in heads {
            walk.push(*head)
                .map_err(err(format!("cannot walk from {head}")))?;
        }
        for h in hidden {
            let _ = walk.hide(*h);
        }
        let commits = walk
            .map(|r| r.map_err(err("cannot walk history")))
            .collect::<Result<Vec<Oid>, _>>()?;
        let index: HashMap<Oid, usize> = commits.iter().enumerate().map(|(i, c)| (*c, i)).collect();
        let mut parents = Vec::with_capacity(commits.len());
        let mut first_parent = Vec::with_capacity(commits.len());
        for c in &commits {
            let commit = self
                .repo
                .find_commit(*c)
                .map_err(err(format!("cannot read commit {c}")))?;
            let in_set = |p: Oid| index.get(&p).copied();
            first_parent.push(commit.parent_ids().next().and_then(in_set));
            parents.push(commit.parent_ids().filter_map(in_set).collect());
        }
        Ok(History {
            commits,
            index,
            parents,
            first_parent,
        })
    }

    /// True when the repository holds commit `oid` (a mark can point at a commit that a
    /// force-push and a garbage collection removed).
    pub fn has_commit(&self, oid: Oid) -> bool {
        self.repo.find_commit(oid).is_ok()
    }

    /// True when `ancestor` is `commit` or one of its ancestors.
    pub fn is_ancestor(&self, ancestor: Oid, commit: Oid) -> bool {
        ancestor == commit
            || self
                .repo
                .graph_descendant_of(commit, ancestor)
                .unwrap_or(false)
    }

    /// Author and summary of a commit.
    pub fn commit_info(&self, oid: Oid) -> Result<CommitInfo, GitError> {
        let c = self
            .repo
            .find_commit(oid)
            .map_err(err(format!("cannot read commit {oid}")))?;
        let a = c.author();
        Ok(CommitInfo {
            author: format!(
                "{} <{}>",
                String::from_utf8_lossy(a.name_bytes()),
                String::from_utf8_lossy(a.email_bytes())
            ),
            summary: String::from_utf8_lossy(c.summary_bytes().unwrap_or_default()).into_owned(),
        })
    }

    /// The content of `path` in the tree of commit `oid`, or `None` when there is no such file.
    ///
    /// Errors: the tree cannot be read, or the file is larger than `max_bytes` (its size is read
    /// from the object's header, so a huge blob is never inflated).
    pub fn file_at(
        &self,
        oid: Oid,
        path: &str,
        max_bytes: u64,
    ) -> Result<Option<Vec<u8>>, GitError> {
        let tree = self
            .repo
            .find_commit(oid)
            .and_then(|c| c.tree())
            .map_err(err(format!("cannot read the tree of {oid}")))?;
        let Ok(entry) = tree.get_path(Path::new(path)) else {
            return Ok(None);
        };
        if entry.kind() != Some(git2::ObjectType::Blob) {
            return Ok(None);
        }
        let (size, _) = self
            .repo
            .odb()
            .and_then(|odb| odb.read_header(entry.id()))
            .map_err(err(format!("cannot read {path} at {oid}")))?;
        if size as u64 > max_bytes {
            return Err(GitError {
                context: format!("{path} at {oid}"),
                message: format!("the file is {size} bytes, more than the limit of {max_bytes}"),
            });
        }
        match entry
            .to_object(&self.repo)
            .ok()
            .and_then(|o| o.into_blob().ok())
        {
            Some(blob) => Ok(Some(blob.content().to_vec())),
            None => Ok(None),
        }
    }
}

fn open_or_init_bare(path: &Path) -> Result<Repository, GitError> {
    match Repository::open_bare(path) {
        Ok(r) => Ok(r),
        Err(_) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| GitError {
                    context: format!("cannot create {}", parent.display()),
                    message: e.to_string(),
                })?;
            }
            Repository::init_bare(path)
                .map_err(err(format!("cannot create mirror {}", path.display())))
        }
    }
}

/// Fetches every branch and tag of `url` into `repo`'s own `refs/heads` and `refs/tags`.
///
/// A server that asks for a user and password gets `login` (the watched URL's own), else the
/// line of `store` (the process's [`CredentialStore`], when its logins may go to `url`); asked a second time (a wrong password),
/// the fetch fails instead of trying again forever.
fn fetch_all(
    repo: &Repository,
    url: &str,
    login: Option<&Login>,
    store: Option<&CredentialStore>,
    prune: bool,
) -> Result<(), GitError> {
    let url = &split_credentials(url).0;
    if !is_url(url) && !Path::new(url).exists() {
        return Err(GitError {
            context: format!("cannot fetch {url}"),
            message: "no such repository (the path does not exist on this machine)".into(),
        });
    }
    let mut remote = repo
        .remote_anonymous(url)
        .map_err(err(format!("cannot fetch {url}")))?;
    let login = login.or_else(|| store.and_then(|store| store.login_for(url)));
    let mut asked = false;
    let mut callbacks = git2::RemoteCallbacks::new();
    callbacks.credentials(move |_, _, allowed| {
        let first = !std::mem::replace(&mut asked, true);
        match login {
            Some(l) if first && allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) => {
                git2::Cred::userpass_plaintext(&l.user, &l.password)
            }
            Some(_) => Err(git2::Error::from_str("the server refused the credentials")),
            None => Err(git2::Error::from_str(
                "the server asks for credentials and none are given (a runner takes them \
                 from --git-credentials)",
            )),
        }
    });
    let mut opts = FetchOptions::new();
    opts.remote_callbacks(callbacks);
    if prune {
        opts.prune(git2::FetchPrune::On);
    }
    opts.download_tags(git2::AutotagOption::All);
    let refspecs = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];
    match remote.fetch(&refspecs, Some(&mut opts), None) {
        // Another process updating the same refs holds their lock files for a moment: one retry
        // (see [`Mirror`]'s "Concurrency"; within a process a mutex prevents this).
        Err(e) if e.code() == git2::ErrorCode::Locked => {
            std::thread::sleep(std::time::Duration::from_millis(500));
            remote.fetch(&refspecs, Some(&mut opts), None)
        }
        other => other,
    }
    .map_err(err(format!("cannot fetch {url}")))
}

/// How deep submodules may nest (a submodule of a submodule is depth 2). Real projects stay far
/// below this; the cap turns a pathological chain of repositories into an error, not a hang.
pub const MAX_SUBMODULE_DEPTH: usize = 8;

/// A runner's bare copy of one repository, fetched only when a job needs a commit it lacks.
///
/// Every mirror of a runner lives under one root, named by its URL ([`Mirror::path_for`]), so
/// the mirror of a submodule is found the same way as any other and is shared by every
/// superproject that uses it.
///
/// # Concurrency
///
/// The runner serializes the jobs of one *superproject* with its own async lock, but the same
/// submodule can be needed by two jobs of different superprojects at once, and libgit2 fails a
/// fetch whose ref lock files another fetch holds. So within a process every mirror path has one
/// `std::sync::Mutex` (`path_lock`), held while the mirror is created and while it fetches;
/// reading (checkout) needs no lock, because git objects are immutable and new packs appear
/// atomically. Two *processes* sharing one mirror root is not a supported set-up (each runner has
/// its own `--work-dir`), but a fetch that still meets a held lock file is retried once.
pub struct Mirror {
    repo: Repository,
    url: String,
    path: PathBuf,
    root: PathBuf,
}

impl Mirror {
    /// Opens (or creates) the mirror of `url` under `root`.
    pub fn open(url: &str, root: &Path) -> Result<Mirror, GitError> {
        let path = Mirror::path_for(url, root);
        let lock = path_lock(&path);
        let _guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(Mirror {
            repo: open_or_init_bare(&path)?,
            url: url.to_string(),
            path,
            root: root.to_path_buf(),
        })
    }

    /// Where the mirror of `url` lives under `root`: `<slug>-<hash>.git`.
    pub fn path_for(url: &str, root: &Path) -> PathBuf {
        root.join(format!("{}-{}.git", repo_slug(url), text_hash(url)))
    }

    /// Makes sure `sha` is in the mirror, fetching when it is not (an incremental fetch: git
    /// sends only what the mirror lacks).
    ///
    /// Errors: the fetch fails, or the commit is not in the repository after it.
    pub fn ensure_commit(&self, sha: &str) -> Result<Oid, GitError> {
        self.fetch_commit(sha, true)
    }

    /// [`Mirror::ensure_commit`], offering the process's logins ([`use_credentials`]) to the
    /// server only when `logins` is true.
    fn fetch_commit(&self, sha: &str, logins: bool) -> Result<Oid, GitError> {
        let oid = Oid::from_str(sha).map_err(err(format!("{sha} is not a commit id")))?;
        if self.repo.find_commit(oid).is_ok() {
            return Ok(oid);
        }
        {
            let lock = path_lock(&self.path);
            let _guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            // Another job may have fetched it while this one waited for the lock.
            if self.repo.find_commit(oid).is_err() {
                let store = CREDENTIALS.get().filter(|_| logins);
                fetch_all(&self.repo, &self.url, None, store, false)?;
            }
        }
        self.repo
            .find_commit(oid)
            .map(|c| c.id())
            .map_err(|_| GitError {
                context: format!("commit {sha}"),
                message: format!(
                    "not found in {} (was the branch force-pushed away?)",
                    self.url
                ),
            })
    }

    /// Writes the tree of commit `oid` into the empty directory `dest` (no `.git` inside), then
    /// the tree of every submodule into its path, recursively: each job sees what
    /// `git clone --recurse-submodules` would give it.
    ///
    /// A submodule is a gitlink entry (a commit id) in the tree plus its `submodule.<name>.path`
    /// and `.url` in the *same commit's* `.gitmodules`. Its URL is resolved like git does
    /// ([`resolve_submodule_url`]: `./` and `../` are relative to this mirror's URL), its commit
    /// is fetched into that URL's mirror under the same root when missing, and its tree is
    /// checked out (again without `.git`) into `dest/<path>`.
    ///
    /// Errors: the commit cannot be read or written out; a gitlink has no `.gitmodules` entry;
    /// a submodule cannot be fetched or lacks its commit; submodules nest deeper than
    /// [`MAX_SUBMODULE_DEPTH`]. [`CheckoutError::Refused`]: a submodule URL the runner does not
    /// fetch for a job ([`check_submodule_url`]). Every submodule error starts with
    /// `submodule <path> (<url>)`.
    ///
    /// The runner's logins (`--git-credentials`) are offered to a submodule only on the scheme,
    /// host and port of the repository being checked out (this mirror's URL): a commit cannot
    /// send them to a server of its choosing.
    pub fn checkout(&self, oid: Oid, dest: &Path) -> Result<(), CheckoutError> {
        let mut chain = vec![(self.path.clone(), oid)];
        self.checkout_recursive(oid, dest, "", &self.url, &mut chain)
    }

    /// [`Mirror::checkout`] for a commit at `prefix` (`""` for the job's own commit, `a/b/` for
    /// a submodule at `a/b`), `top` the URL of the repository whose commit the job checks out, and
    /// `chain` the mirrors and commits being checked out above it.
    fn checkout_recursive(
        &self,
        oid: Oid,
        dest: &Path,
        prefix: &str,
        top: &str,
        chain: &mut Vec<(PathBuf, Oid)>,
    ) -> Result<(), CheckoutError> {
        let commit = self
            .repo
            .find_commit(oid)
            .map_err(err(format!("cannot read commit {oid}")))?;
        let tree = commit
            .tree()
            .map_err(err(format!("cannot read the tree of {oid}")))?;
        let links = gitlinks(&tree)?;
        // libgit2 refuses to check out a tree with gitlinks from a bare repository ("cannot get
        // submodules without a working tree"), so the superproject's part is checked out from a
        // copy of the tree without them. The copy's trees are written into the mirror; they are
        // small, and the same for every job of the commit.
        let files = if links.is_empty() {
            tree
        } else {
            let mut update = git2::build::TreeUpdateBuilder::new();
            for (path, _) in &links {
                update.remove(path.as_str());
            }
            update
                .create_updated(&self.repo, &tree)
                .and_then(|id| self.repo.find_tree(id))
                .map_err(err(format!(
                    "cannot strip the submodules from the tree of {oid}"
                )))?
        };
        let mut cb = CheckoutBuilder::new();
        cb.target_dir(dest)
            .force()
            .recreate_missing(true)
            .update_index(false);
        self.repo
            .checkout_tree(files.as_object(), Some(&mut cb))
            .map_err(err(format!(
                "cannot check out {oid} into {}",
                dest.display()
            )))?;
        if links.is_empty() {
            return Ok(());
        }
        let modules = self.gitmodules(&files, oid)?;
        for (path, sub_oid) in links {
            let shown = format!("{prefix}{path}");
            let Some(raw_url) = modules.get(&path) else {
                return Err(GitError {
                    context: format!("submodule {shown}"),
                    message: format!(
                        "commit {oid} has no entry with path = {path} in its .gitmodules, so the \
                         submodule's URL is unknown"
                    ),
                }
                .into());
            };
            let sub_err = |message: String| GitError {
                context: format!("submodule {shown} ({raw_url})"),
                message,
            };
            let url = resolve_submodule_url(&self.url, raw_url).ok_or_else(|| {
                sub_err(format!(
                    "cannot resolve the relative URL against the superproject's {}",
                    self.url
                ))
            })?;
            let sub_err = |e: GitError| GitError {
                context: format!("submodule {shown} ({url})"),
                message: e.to_string(),
            };
            check_submodule_url(top, &url, &self.root).map_err(|message| {
                CheckoutError::Refused(GitError {
                    context: format!("submodule {shown} ({url})"),
                    message,
                })
            })?;
            if chain.len() > MAX_SUBMODULE_DEPTH {
                return Err(sub_err(GitError {
                    context: "too deep".into(),
                    message: format!("submodules nest more than {MAX_SUBMODULE_DEPTH} levels"),
                })
                .into());
            }
            let mirror = Mirror::open(&url, &self.root).map_err(sub_err)?;
            // A commit cannot contain itself through gitlinks (its id would depend on itself),
            // so this only guards against the impossible; the depth cap bounds the rest, such as
            // a repository that holds an older commit of itself as a submodule.
            if chain.contains(&(mirror.path.clone(), sub_oid)) {
                return Err(sub_err(GitError {
                    context: "cycle".into(),
                    message: format!("commit {sub_oid} contains itself"),
                })
                .into());
            }
            mirror
                .fetch_commit(&sub_oid.to_string(), same_origin(top, &url))
                .map_err(sub_err)?;
            let sub_dest = dest.join(&path);
            std::fs::create_dir_all(&sub_dest).map_err(|e| GitError {
                context: format!("submodule {shown} ({url})"),
                message: format!("cannot create {}: {e}", sub_dest.display()),
            })?;
            chain.push((mirror.path.clone(), sub_oid));
            // Errors from below already name their own full path and URL.
            mirror.checkout_recursive(sub_oid, &sub_dest, &format!("{shown}/"), top, chain)?;
            chain.pop();
        }
        Ok(())
    }

    /// The submodules declared in the `.gitmodules` of `tree` (commit `oid`): path → URL as
    /// written. No `.gitmodules` is an empty map.
    ///
    /// libgit2 parses config only from a file, so the blob is written to a uniquely named file
    /// inside this mirror's own directory (which only this runner writes), read, and removed.
    fn gitmodules(
        &self,
        tree: &git2::Tree<'_>,
        oid: Oid,
    ) -> Result<std::collections::HashMap<String, String>, GitError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);

        let mut modules = std::collections::HashMap::new();
        let Some(blob) = tree
            .get_name(".gitmodules")
            .and_then(|e| e.to_object(&self.repo).ok())
            .and_then(|o| o.into_blob().ok())
        else {
            return Ok(modules);
        };
        let file = self.repo.path().join(format!(
            "jetci-gitmodules-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let io_err = |e: std::io::Error| GitError {
            context: format!("cannot read the .gitmodules of {oid}"),
            message: e.to_string(),
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
            .map_err(io_err)?;
        let _remove = RemoveOnDrop(&file);
        std::io::Write::write_all(&mut f, blob.content()).map_err(io_err)?;
        drop(f);

        let ctx = format!("cannot parse the .gitmodules of {oid}");
        let config = git2::Config::open(&file).map_err(err(ctx.clone()))?;
        let mut paths = Vec::new();
        let mut urls = std::collections::HashMap::new();
        let mut entries = config
            .entries(Some(r"^submodule\..*\.(path|url)$"))
            .map_err(err(ctx.clone()))?;
        while let Some(entry) = entries.next() {
            let entry = entry.map_err(err(ctx.clone()))?;
            let name = String::from_utf8_lossy(entry.name_bytes()).into_owned();
            let value = String::from_utf8_lossy(entry.value_bytes()).into_owned();
            if let Some(module) = name.strip_prefix("submodule.") {
                if let Some(module) = module.strip_suffix(".path") {
                    paths.push((module.to_string(), value));
                } else if let Some(module) = module.strip_suffix(".url") {
                    urls.insert(module.to_string(), value);
                }
            }
        }
        for (module, path) in paths {
            if let Some(url) = urls.get(&module) {
                modules.insert(path.trim_end_matches('/').to_string(), url.clone());
            }
        }
        Ok(modules)
    }
}

/// Removes a scratch file when dropped, whatever path the function leaves by.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// The process-wide lock of the mirror at `path` (see [`Mirror`]'s "Concurrency").
fn path_lock(path: &Path) -> std::sync::Arc<std::sync::Mutex<()>> {
    use std::sync::{Arc, Mutex, OnceLock};
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
    let mut map = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    map.entry(path.to_path_buf()).or_default().clone()
}

/// Every gitlink (submodule commit) in `tree`, recursively: `(path, commit id)`, paths with `/`.
///
/// A path component that could escape the checkout (`..`, `.`, `.git`, empty) is an error: the
/// tree of a hostile repository must not make the runner write outside the job's directory.
fn gitlinks(tree: &git2::Tree<'_>) -> Result<Vec<(String, Oid)>, GitError> {
    let mut links = Vec::new();
    let mut bad = None;
    tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
        if entry.kind() == Some(ObjectType::Commit) {
            let path = format!("{dir}{}", String::from_utf8_lossy(entry.name_bytes()));
            let unsafe_part = path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == ".." || c.eq_ignore_ascii_case(".git"));
            if unsafe_part {
                bad = Some(path);
                return git2::TreeWalkResult::Abort;
            }
            links.push((path, entry.id()));
        }
        git2::TreeWalkResult::Ok
    })
    .or_else(|e| {
        // Aborting the walk on purpose reports a "user" error; `bad` says why.
        if bad.is_some() {
            Ok(())
        } else {
            Err(e)
        }
    })
    .map_err(err("cannot list the submodules of a tree"))?;
    if let Some(path) = bad {
        return Err(GitError {
            context: format!("submodule {path}"),
            message: "the path is not a safe place for a checkout".into(),
        });
    }
    Ok(links)
}

/// Whether a runner fetches, for a job of the repository at `top` (its URL or local path), a
/// submodule from `url` (resolved, [`resolve_submodule_url`]); `mirror_root` is the runner's
/// mirrors dir, whose parent is its work dir. Pure but for resolving symlinks of local paths.
///
/// A submodule on a server (any URL but `file://`) is fetched as any repository. One on the
/// runner's own disk (a path, or a `file://` URL) is fetched only for a *local* `top` (a path
/// or `file://`), when it lies in the directory that holds `top` (beside it, as `../lib.git`
/// or `/srv/git/lib.git` for `/srv/git/app`) and outside the runner's work dir (another
/// repository's mirror there is not the job's to read). A remote repository's commit cannot
/// make the runner read its own disk.
///
/// Errors: why it is refused, in one line.
pub fn check_submodule_url(top: &str, url: &str, mirror_root: &Path) -> Result<(), String> {
    let Some(path) = local_path(url) else {
        return Ok(());
    };
    let Some(top) = local_path(top) else {
        return Err(
            "a submodule of a repository on a server must be on a server too: the runner does \
             not read paths or file:// URLs on its own disk for it"
                .into(),
        );
    };
    if !path.is_absolute() {
        return Err("a local submodule must be an absolute path or relative with ./ or ../".into());
    }
    let real = |p: &Path| {
        let p = normalize(p);
        std::fs::canonicalize(&p).unwrap_or(p)
    };
    let (path, top) = (real(&path), real(&top));
    let beside = top.parent().unwrap_or(&top);
    if !path.starts_with(beside) {
        return Err(format!(
            "a local repository's submodules must lie beside it, in {}",
            beside.display()
        ));
    }
    let root = real(mirror_root);
    let work_dir = root.parent().unwrap_or(&root);
    if path.starts_with(work_dir) {
        return Err(format!(
            "it lies in the runner's work dir {}, which no job may read",
            work_dir.display()
        ));
    }
    Ok(())
}

/// The path a repository `url` names on this machine: a path, or a `file://` URL's; `None` for
/// a URL of a server.
fn local_path(url: &str) -> Option<PathBuf> {
    if let Some(rest) = url.strip_prefix("file://") {
        // file:///srv/x and file://localhost/srv/x
        let rest = rest.strip_prefix("localhost").unwrap_or(rest);
        return Some(PathBuf::from(rest));
    }
    (!is_url(url)).then(|| PathBuf::from(url))
}

/// `path` without `.` and with each `..` taking away the part before it (lexically).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Whether two repository URLs are on the same server: the same scheme, host and port (never
/// for a local path). Only then may the runner's logins for one go to the other.
pub fn same_origin(a: &str, b: &str) -> bool {
    let origin = |u: &str| split_origin(&split_credentials(u).0).map(|(origin, _)| origin);
    match (origin(a), origin(b)) {
        (Some(a), Some(b)) => a == b && !a.starts_with("file:"),
        _ => false,
    }
}

/// The URL of a submodule whose `.gitmodules` URL is `url`, in a superproject fetched from
/// `superproject`: git's own rule (`git submodule init`).
///
/// Only a URL starting with `./` or `../` is relative; anything else is used as written. A
/// relative URL is taken relative to the superproject's URL as a directory: each leading `../`
/// removes the last `/`-separated component of that URL (for an scp-like `host:path` with no `/`
/// left, the part after `:`), each `./` removes nothing, and the rest is appended. So with the
/// superproject at `/srv/git/app` (or `https://host/org/app.git`), `../lib.git` is
/// `/srv/git/lib.git` (`https://host/org/lib.git`) and `./sub` is `/srv/git/app/sub`. `None`
/// when there are more `../` than components to remove.
pub fn resolve_submodule_url(superproject: &str, url: &str) -> Option<String> {
    if !(url.starts_with("./") || url.starts_with("../")) {
        return Some(url.to_string());
    }
    let mut base = superproject
        .strip_suffix('/')
        .unwrap_or(superproject)
        .to_string();
    let mut rest = url;
    let mut colon = false;
    loop {
        if let Some(r) = rest.strip_prefix("../") {
            rest = r;
            if let Some(i) = base.rfind('/') {
                base.truncate(i);
            } else if let Some(i) = base.rfind(':') {
                base.truncate(i);
                colon = true;
            } else {
                return None;
            }
        } else if let Some(r) = rest.strip_prefix("./") {
            rest = r;
        } else {
            break;
        }
    }
    let joined = format!("{base}{}{rest}", if colon { ":" } else { "/" });
    Some(joined.strip_suffix('/').unwrap_or(&joined).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit_file(
        repo: &Repository,
        branch: &str,
        name: &str,
        content: &str,
        parents: &[Oid],
    ) -> Oid {
        let blob = repo.blob(content.as_bytes()).unwrap();
        let mut tb = repo.treebuilder(None).unwrap();
        tb.insert(name, blob, 0o100644).unwrap();
        let tree = repo.find_tree(tb.write().unwrap()).unwrap();
        let sig = git2::Signature::now("T", "t@x").unwrap();
        let parents: Vec<_> = parents
            .iter()
            .map(|p| repo.find_commit(*p).unwrap())
            .collect();
        let refs: Vec<_> = parents.iter().collect();
        repo.commit(
            Some(&format!("refs/heads/{branch}")),
            &sig,
            &sig,
            name,
            &tree,
            &refs,
        )
        .unwrap()
    }

    #[test]
    fn credentials_are_split_off_urls() {
        let (shown, login) = split_credentials("https://ci:t%40k@host:8443/org/app.git");
        assert_eq!(shown, "https://host:8443/org/app.git");
        let login = login.unwrap();
        assert_eq!(
            (login.user.as_str(), login.password.as_str()),
            ("ci", "t@k")
        );
        assert!(!format!("{login:?}").contains("t@k"));
        for same in [
            "/srv/git/app",
            "git@host:org/app",
            "ssh://git@host/app",
            "https://host/a@b",
        ] {
            assert_eq!(split_credentials(same), (same.to_string(), None), "{same}");
        }

        let store = CredentialStore::parse(
            "# logins\nhttps://a:1@host\n\nhttps://b:2@host/org/private\nhttp://c:3@other:81\n",
        )
        .unwrap();
        let user = |url: &str| store.login_for(url).map(|l| l.user.clone());
        assert_eq!(
            user("https://host/org/private/app.git").as_deref(),
            Some("b")
        );
        assert_eq!(user("https://HOST/org/app.git").as_deref(), Some("a"));
        assert_eq!(user("http://other:81/x.git").as_deref(), Some("c"));
        assert_eq!(user("http://other/x.git"), None);
        assert_eq!(user("https://elsewhere/x.git"), None);
        let e = CredentialStore::parse("https://host/app.git\n").unwrap_err();
        assert_eq!(e, "line 1 is not a URL with a user and a password");
    }

    #[test]
    fn urls_and_paths() {
        assert!(is_url("https://x/y.git"));
        assert!(is_url("git@github.com:a/b"));
        assert!(is_url("file:///srv/x"));
        assert!(!is_url("/srv/x"));
        assert!(!is_url("./a:b"));
        assert_ne!(text_hash("main"), text_hash("main2"));
        assert_eq!(text_hash("x").len(), 16);
    }

    #[test]
    fn new_commits_oldest_first_and_checkout() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path().join("r.git")).unwrap();
        let a = commit_file(&repo, "main", "a.txt", "1", &[]);
        let b = commit_file(&repo, "main", "b.txt", "2", &[a]);
        let c = commit_file(&repo, "main", "c.txt", "3", &[b]);
        let f = commit_file(&repo, "feature/x.y", "f.txt", "4", &[b]);
        let w = Watched::open(dir.path().join("r.git").to_str().unwrap(), dir.path()).unwrap();
        let branches = w.branches().unwrap();
        assert_eq!(
            branches,
            vec![("feature/x.y".into(), f), ("main".into(), c)]
        );
        assert_eq!(w.new_history(&[c], &[a]).unwrap().commits, vec![b, c]);
        assert_eq!(w.new_history(&[f], &[c]).unwrap().commits, vec![f]);
        let both = w.new_history(&[c, f], &[a]).unwrap();
        assert_eq!(both.commits.len(), 3);
        assert_eq!(both.parents[both.index[&f]], vec![both.index[&b]]);
        assert!(both.parents[both.index[&b]].is_empty(), "a is hidden");
        assert_eq!(both.first_parent[both.index[&f]], Some(both.index[&b]));
        assert_eq!(both.first_parent[both.index[&b]], None, "a is hidden");
        assert_eq!(
            w.file_at(b, "b.txt", 1).unwrap().as_deref(),
            Some(&b"2"[..])
        );
        assert_eq!(w.file_at(c, "nope", 1).unwrap(), None);
        let e = w.file_at(b, "b.txt", 0).unwrap_err();
        assert!(
            e.to_string().contains("1 bytes, more than the limit of 0"),
            "{e}"
        );
        assert!(w.is_ancestor(a, c));
        assert!(!w.is_ancestor(f, c));
        repo.set_head("refs/heads/feature/x.y").unwrap();
        assert_eq!(w.head_branch(), Some("feature/x.y".into()));
        repo.set_head_detached(c).unwrap();
        assert_eq!(w.head_branch(), None);

        let mirrors = dir.path().join("mirrors");
        let m = Mirror::open(&w.url, &mirrors).unwrap();
        let oid = m.ensure_commit(&f.to_string()).unwrap();
        let dest = dir.path().join("job");
        std::fs::create_dir(&dest).unwrap();
        m.checkout(oid, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("f.txt")).unwrap(), "4");
        assert!(m.ensure_commit(&"1".repeat(40)).is_err());
    }

    /// Commits, on `main` of the bare repository `dir/name.git` (created when missing), a tree
    /// of `files` (nested paths allowed) and gitlinks `links`; returns the commit.
    fn commit_with_links(
        dir: &Path,
        name: &str,
        files: &[(&str, &str)],
        links: &[(&str, Oid)],
    ) -> Oid {
        let path = dir.join(format!("{name}.git"));
        let repo =
            Repository::open_bare(&path).unwrap_or_else(|_| Repository::init_bare(&path).unwrap());
        let empty = repo
            .find_tree(repo.treebuilder(None).unwrap().write().unwrap())
            .unwrap();
        let mut update = git2::build::TreeUpdateBuilder::new();
        for (file, content) in files {
            let blob = repo.blob(content.as_bytes()).unwrap();
            update.upsert(*file, blob, git2::FileMode::Blob);
        }
        for (link, oid) in links {
            update.upsert(*link, *oid, git2::FileMode::Commit);
        }
        let tree = repo
            .find_tree(update.create_updated(&repo, &empty).unwrap())
            .unwrap();
        let sig = git2::Signature::now("T", "t@x").unwrap();
        let parent = repo
            .find_reference("refs/heads/main")
            .ok()
            .and_then(|r| r.peel_to_commit().ok());
        let parents: Vec<_> = parent.iter().collect();
        repo.commit(Some("refs/heads/main"), &sig, &sig, name, &tree, &parents)
            .unwrap()
    }

    fn url_of(dir: &Path, name: &str) -> String {
        dir.join(format!("{name}.git"))
            .to_str()
            .unwrap()
            .to_string()
    }

    /// `app` has `vendor/lib` (relative URL `../lib.git`), which has `deep` (`./../nested.git`).
    fn app_with_nested_submodules(dir: &Path) -> Oid {
        let nested = commit_with_links(dir, "nested", &[("n.txt", "nested")], &[]);
        let gm = "[submodule \"deep\"]\n\tpath = deep\n\turl = ./../nested.git\n";
        let lib = commit_with_links(
            dir,
            "lib",
            &[("lib.txt", "lib"), (".gitmodules", gm)],
            &[("deep", nested)],
        );
        let gm = "[submodule \"the.lib\"]\n\tpath = vendor/lib\n\turl = ../lib.git\n";
        commit_with_links(
            dir,
            "app",
            &[
                ("a.txt", "app"),
                ("vendor/other.txt", "o"),
                (".gitmodules", gm),
            ],
            &[("vendor/lib", lib)],
        )
    }

    fn checkout_error(dir: &Path, name: &str, oid: Oid) -> String {
        let m = Mirror::open(&url_of(dir, name), &dir.join("runner/mirrors")).unwrap();
        m.ensure_commit(&oid.to_string()).unwrap();
        let dest = dir.join(format!("job-{oid}"));
        std::fs::create_dir(&dest).unwrap();
        m.checkout(oid, &dest).unwrap_err().to_string()
    }

    #[test]
    fn checkout_writes_nested_submodules() {
        let dir = tempfile::tempdir().unwrap();
        let app = app_with_nested_submodules(dir.path());
        let m = Mirror::open(
            &url_of(dir.path(), "app"),
            &dir.path().join("runner/mirrors"),
        )
        .unwrap();
        m.ensure_commit(&app.to_string()).unwrap();
        let dest = dir.path().join("job");
        std::fs::create_dir(&dest).unwrap();
        m.checkout(app, &dest).unwrap();
        let read = |p: &str| std::fs::read_to_string(dest.join(p)).unwrap();
        assert_eq!(read("a.txt"), "app");
        assert_eq!(read("vendor/other.txt"), "o");
        assert_eq!(read("vendor/lib/lib.txt"), "lib");
        assert_eq!(read("vendor/lib/deep/n.txt"), "nested");
        assert!(!dest.join(".git").exists() && !dest.join("vendor/lib/.git").exists());
        // Each submodule got its own mirror under the same root.
        for name in ["lib", "nested"] {
            assert!(Mirror::path_for(
                &url_of(dir.path(), name),
                &dir.path().join("runner/mirrors")
            )
            .is_dir());
        }
    }

    #[test]
    fn concurrent_checkouts_share_submodule_mirrors() {
        let dir = tempfile::tempdir().unwrap();
        let app = app_with_nested_submodules(dir.path());
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let dir = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    let m =
                        Mirror::open(&url_of(&dir, "app"), &dir.join("runner/mirrors")).unwrap();
                    m.ensure_commit(&app.to_string()).unwrap();
                    let dest = dir.join(format!("job{i}"));
                    std::fs::create_dir(&dest).unwrap();
                    m.checkout(app, &dest).unwrap();
                    assert!(dest.join("vendor/lib/deep/n.txt").is_file());
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn gitlink_without_gitmodules_entry_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let lib = commit_with_links(dir.path(), "lib", &[("lib.txt", "lib")], &[]);
        let app = commit_with_links(dir.path(), "app", &[("a.txt", "a")], &[("vendor/lib", lib)]);
        let e = checkout_error(dir.path(), "app", app);
        assert!(e.starts_with("submodule vendor/lib:"), "{e}");
        assert!(e.contains(".gitmodules"), "{e}");
    }

    #[test]
    fn unreachable_or_missing_submodule_commit_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let lib = commit_with_links(dir.path(), "lib", &[("lib.txt", "lib")], &[]);
        let gm = "[submodule \"lib\"]\n\tpath = lib\n\turl = ../nowhere.git\n";
        let app = commit_with_links(dir.path(), "app", &[(".gitmodules", gm)], &[("lib", lib)]);
        let e = checkout_error(dir.path(), "app", app);
        let nowhere = url_of(dir.path(), "nowhere");
        assert!(
            e.starts_with(&format!("submodule lib ({nowhere}): cannot fetch")),
            "{e}"
        );

        // The URL exists but lacks the commit (say, it was force-pushed away).
        let gm = "[submodule \"lib\"]\n\tpath = lib\n\turl = ../lib.git\n";
        let other = commit_with_links(dir.path(), "other", &[("x", "x")], &[]);
        let app = commit_with_links(dir.path(), "app", &[(".gitmodules", gm)], &[("lib", other)]);
        let e = checkout_error(dir.path(), "app", app);
        assert!(e.starts_with("submodule lib ("), "{e}");
        assert!(e.contains(&format!("commit {other}")), "{e}");
    }

    #[test]
    fn nesting_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let gm = "[submodule \"s\"]\n\tpath = s\n\turl = ../r{}.git\n";
        let mut below = commit_with_links(dir.path(), "r20", &[("x", "x")], &[]);
        for i in (0..20).rev() {
            let gm = gm.replace("{}", &(i + 1).to_string());
            below = commit_with_links(
                dir.path(),
                &format!("r{i}"),
                &[(".gitmodules", &gm)],
                &[("s", below)],
            );
        }
        let e = checkout_error(dir.path(), "r0", below);
        assert!(e.contains("more than 8 levels"), "{e}");
        // Eight levels check out; the ninth is refused.
        assert!(e.starts_with("submodule s/s/s/s/s/s/s/s/s ("), "{e}");
        let eighth = dir.path().join(format!("job-{below}/s/s/s/s/s/s/s/s"));
        assert!(eighth.join(".gitmodules").is_file());
        assert!(!eighth.join("s/.gitmodules").exists());
    }

    #[test]
    fn relative_submodule_urls_follow_git() {
        let r = resolve_submodule_url;
        assert_eq!(r("/srv/git/app", "../lib.git").unwrap(), "/srv/git/lib.git");
        assert_eq!(
            r("/srv/git/app/", "../lib.git").unwrap(),
            "/srv/git/lib.git"
        );
        assert_eq!(r("/srv/git/app", "./sub").unwrap(), "/srv/git/app/sub");
        assert_eq!(r("/srv/git/app", "./../../x/").unwrap(), "/srv/x");
        assert_eq!(
            r("https://host/org/app.git", "../lib.git").unwrap(),
            "https://host/org/lib.git"
        );
        assert_eq!(r("git@host:org/app", "../lib").unwrap(), "git@host:org/lib");
        assert_eq!(r("git@host:app", "../lib").unwrap(), "git@host:lib");
        assert_eq!(r("/srv/app", "https://x/y.git").unwrap(), "https://x/y.git");
        assert_eq!(r("/srv/app", "/abs/y").unwrap(), "/abs/y");
        assert_eq!(r("app", "../../x"), None);
    }

    #[test]
    fn local_submodules_only_beside_a_local_repository_and_outside_the_work_dir() {
        let root = Path::new("/var/lib/jetci/r1/mirrors");
        let ok = |top: &str, url: &str| check_submodule_url(top, url, root);
        // Servers' submodules are fetched as any repository.
        assert_eq!(ok("https://h/org/app.git", "https://other/lib.git"), Ok(()));
        assert_eq!(ok("/srv/git/app", "git@h:lib"), Ok(()));
        // Beside a local repository.
        assert_eq!(ok("/srv/git/app", "/srv/git/lib.git"), Ok(()));
        assert_eq!(ok("file:///srv/git/app", "file:///srv/git/x/lib"), Ok(()));
        for (top, url, why) in [
            (
                "https://h/org/app.git",
                "/srv/git/lib.git",
                "on a server too",
            ),
            (
                "https://h/org/app.git",
                "file:///srv/git/lib.git",
                "on a server too",
            ),
            ("git@h:org/app", "/etc", "on a server too"),
            ("/srv/git/app", "/home/u/lib", "beside it, in /srv/git"),
            ("/srv/git/app", "/srv/git/../../etc/x", "beside it"),
            ("/srv/git/app", "lib.git", "absolute"),
            (
                "/var/lib/app",
                "/var/lib/jetci/r1/mirrors/x.git",
                "runner's work dir",
            ),
            (
                "/var/lib/app",
                "file://localhost/var/lib/jetci/r1/pending",
                "work dir",
            ),
        ] {
            let e = ok(top, url).expect_err(url);
            assert!(e.contains(why), "{top} {url}: {e}");
        }
    }

    #[test]
    fn logins_go_only_to_the_same_server() {
        assert!(same_origin(
            "https://h/org/app.git",
            "https://H/org/lib.git"
        ));
        assert!(same_origin("https://u:p@h:8443/a", "https://h:8443/b"));
        assert!(!same_origin("https://h/a", "http://h/a"));
        assert!(!same_origin("https://h/a", "https://h:8443/a"));
        assert!(!same_origin("https://h/a", "https://evil/a"));
        assert!(!same_origin("/srv/git/app", "/srv/git/lib"));
        assert!(!same_origin("file:///srv/a", "file:///srv/b"));
    }

    #[test]
    fn a_submodule_in_the_runners_work_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mirrors = dir.path().join("runner/mirrors");
        let first = commit_with_links(dir.path(), "app", &[("a.txt", "a")], &[]);
        let own = Mirror::path_for(&url_of(dir.path(), "app"), &mirrors);
        let gm = format!("[submodule \"s\"]\n\tpath = s\n\turl = {}\n", own.display());
        let app = commit_with_links(dir.path(), "app", &[(".gitmodules", &gm)], &[("s", first)]);
        let m = Mirror::open(&url_of(dir.path(), "app"), &mirrors).unwrap();
        m.ensure_commit(&app.to_string()).unwrap();
        let dest = dir.path().join("job");
        std::fs::create_dir(&dest).unwrap();
        match m.checkout(app, &dest) {
            Err(CheckoutError::Refused(e)) => {
                assert!(e.to_string().contains("runner's work dir"), "{e}");
                assert!(e.context.starts_with("submodule s ("), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!dest.join("s/a.txt").exists());
    }
}
