//! Workspaces with submodules: the runner checks every submodule (and theirs) out of its own
//! mirrors, resolving relative URLs like git, and a submodule it cannot fetch makes the commit's
//! result `error`, naming the submodule.

use serde_json::Value;

use crate::support::git::GitRepo;
use crate::support::jetstream::wait_results;
use crate::support::nats::NatsServer;
use crate::support::system::System;
use crate::support::waiting::BOUND;

/// `git submodule add <url> <path>` in `repo`. Git >= 2.38 refuses local (`file`) submodules
/// unless told otherwise; the setting is given to this command only.
fn submodule_add(repo: &GitRepo, url: &str, path: &str) {
    repo.run_git(&[
        "-c",
        "protocol.file.allow=always",
        "submodule",
        "add",
        "-q",
        url,
        path,
    ]);
}

/// `../<directory name of other>`: a sibling repository, relative to `repo` (which has no
/// remote, so git and jetci both resolve it against the repository's own path).
fn sibling(other: &GitRepo) -> String {
    let name = other.path().file_name().expect("repo dir name");
    format!("../{}", name.to_str().expect("utf-8 name"))
}

async fn only_result(nats: &NatsServer) -> Value {
    let results = wait_results(&nats.url(), 1, BOUND).await;
    results.into_iter().next().expect("one result")
}

#[tokio::test(flavor = "multi_thread")]
async fn submodules_and_their_submodules_are_checked_out() {
    let nats = NatsServer::start();
    let nested = GitRepo::new();
    nested.commit("nested", &[("n.txt", "nested")]);
    let lib = GitRepo::new();
    lib.commit("lib", &[("lib.txt", "lib")]);
    submodule_add(&lib, &sibling(&nested), "nested");
    lib.commit("add nested", &[]);
    let app = GitRepo::new();
    app.commit("app", &[("a.txt", "a")]);
    submodule_add(&app, &sibling(&lib), "sub");
    let sha = app.commit(
        "add sub",
        &[(
            ".jetci.toml",
            "command = \"test -f sub/lib.txt && test -f sub/nested/n.txt && test -f a.txt\"\n",
        )],
    );

    let _sys = System::start(&nats, &app, &["r0"]);
    let r = only_result(&nats).await;
    assert_eq!(r["sha"], sha.as_str(), "{r:#}");
    assert_eq!(r["status"], "passed", "{r:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_submodule_that_cannot_be_fetched_is_an_error_naming_it() {
    let nats = NatsServer::start();
    let lib = GitRepo::new();
    lib.commit("lib", &[("lib.txt", "lib")]);
    let app = GitRepo::new();
    app.commit("app", &[("a.txt", "a")]);
    submodule_add(&app, &sibling(&lib), "sub");
    let missing = "/nonexistent/jetci-missing.git";
    app.run_git(&["config", "-f", ".gitmodules", "submodule.sub.url", missing]);
    let sha = app.commit(
        "point sub nowhere",
        &[(".jetci.toml", "command = \"true\"\n")],
    );

    let _sys = System::start(&nats, &app, &["r0"]);
    let r = only_result(&nats).await;
    assert_eq!(r["sha"], sha.as_str(), "{r:#}");
    assert_eq!(r["status"], "error", "{r:#}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("submodule sub ({missing})")),
        "the reason should name the submodule and its URL: {r:#}"
    );
}

/// A submodule URL is the repository's to choose: one pointing into the runner's work dir (here
/// at the runner's own mirror of the repository; another repository's would do the same) used to
/// be fetched outside the sandbox and checked out for the job to read.
#[tokio::test(flavor = "multi_thread")]
async fn a_submodule_in_the_runners_work_dir_is_refused_naming_it() {
    let nats = NatsServer::start();
    let app = GitRepo::new();
    let first = app.commit("app", &[("a.txt", "from the mirror")]);
    let sys = System::start(&nats, &app, &["r0"]);
    let r = only_result(&nats).await;
    assert_eq!(r["status"], "passed", "{r:#}");
    let url = std::fs::canonicalize(app.path()).expect("repo path");
    let mirror = jetci::git::Mirror::path_for(
        url.to_str().expect("utf-8"),
        &sys.work.path().join("r0").join("mirrors"),
    );
    assert!(mirror.is_dir(), "{}", mirror.display());
    // A gitlink to the first commit; an uninitialized submodule is an empty directory.
    std::fs::create_dir(app.path().join("s")).expect("mkdir");
    app.run_git(&[
        "update-index",
        "--add",
        "--cacheinfo",
        &format!("160000,{first},s"),
    ]);
    let modules = format!(
        "[submodule \"s\"]\n\tpath = s\n\turl = {}\n",
        mirror.display()
    );
    let sha = app.commit(
        "a submodule from the runner's disk",
        &[
            (".gitmodules", &modules),
            (".jetci.toml", "command = \"cat s/a.txt\"\n"),
        ],
    );
    let results = wait_results(&nats.url(), 2, BOUND).await;
    let r = results
        .iter()
        .find(|r| r["sha"] == sha.as_str())
        .expect("the second commit's result");
    assert_eq!(r["status"], "error", "{r:#}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("submodule s ({})", mirror.display()))
            && reason.contains("runner's work dir"),
        "{r:#}"
    );
    assert!(
        !r["output_tail"]
            .as_str()
            .unwrap_or_default()
            .contains("from the mirror"),
        "{r:#}"
    );
}

/// A git server on loopback that asks every request for a login and writes down the
/// `Authorization` header each one came with (`-` for none). Test-only.
const LOGIN_TRAP: &str = r#"
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, seen = int(sys.argv[1]), sys.argv[2]
class Trap(BaseHTTPRequestHandler):
    def do_GET(self):
        with open(seen, "a") as f:
            f.write((self.headers.get("Authorization") or "-") + "\n")
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="git"')
        self.send_header("Content-Length", "0")
        self.end_headers()
    do_POST = do_GET
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", port), Trap).serve_forever()
"#;

/// The runner's `--git-credentials` used to go to any server a submodule URL named that had a
/// line in the file: a commit could send them to a server of its choosing. Now only a submodule
/// on the watched repository's own scheme, host and port gets them (a local repository's none).
#[tokio::test(flavor = "multi_thread")]
async fn the_runners_logins_are_not_offered_to_a_submodule_on_another_server() {
    let nats = NatsServer::start();
    let work = tempfile::tempdir().expect("tempdir");
    let seen = work.path().join("seen");
    let port = crate::support::nats::free_port().to_string();
    let _trap = crate::support::processes::Proc::spawn_program(
        std::path::Path::new("python3"),
        &["-c", LOGIN_TRAP, &port, seen.to_str().expect("utf-8")],
        &[],
    );
    crate::support::waiting::wait_until_async("the trap to answer", BOUND, async || {
        std::net::TcpStream::connect(format!("127.0.0.1:{port}")).map(|_| ())
    })
    .await;
    let credentials = work.path().join("git-credentials");
    std::fs::write(
        &credentials,
        format!("http://ci:s3cret-8d1f@127.0.0.1:{port}\n"),
    )
    .expect("write the credentials file");

    let app = GitRepo::new();
    let first = app.commit("app", &[("a.txt", "a")]);
    std::fs::create_dir(app.path().join("s")).expect("mkdir");
    app.run_git(&[
        "update-index",
        "--add",
        "--cacheinfo",
        &format!("160000,{first},s"),
    ]);
    let modules =
        format!("[submodule \"s\"]\n\tpath = s\n\turl = http://127.0.0.1:{port}/lib.git\n");
    app.commit(
        "a submodule on another server",
        &[(".gitmodules", &modules)],
    );
    let mut sys = System::start(&nats, &app, &[]);
    sys.add_runner(
        "r0",
        &["--git-credentials", credentials.to_str().expect("utf-8")],
        &[],
    );
    // The observer's first poll publishes the branch's head only.
    let results = wait_results(&nats.url(), 1, BOUND).await;
    let last = &results[0];
    assert_eq!(last["status"], "error", "{last:#}");
    let asked = std::fs::read_to_string(&seen).unwrap_or_default();
    assert!(
        !asked.is_empty(),
        "the runner never asked the server: {last:#}"
    );
    assert!(
        asked.lines().all(|l| l == "-"),
        "the runner offered its login to another server: {asked}"
    );
}
