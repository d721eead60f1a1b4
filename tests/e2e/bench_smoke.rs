//! Smoke run of the benchmark harness (`jetci-bench --quick`), so it cannot rot: a tiny version of
//! every benchmark against a real nats-server and the real binaries, and a table with the L row
//! and the rows of the newer code paths (jetci-web with a full view, the dispatch rate with
//! instant runners, T as history grows) measured.

use std::process::Command;
use std::time::Instant;

use crate::support::heavy_blocking;
use crate::support::processes::bin_path;

#[test]
fn quick_benchmark_writes_the_table() {
    // It measures, and starts a system of its own: not beside another heavy test.
    let _heavy = heavy_blocking();
    let bench = bin_path("jetci-bench");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("BENCHMARKS.md");
    let started = Instant::now();
    let output = Command::new(&bench)
        .args(["--quick", "--out"])
        .arg(&out)
        .output()
        .expect("cannot run jetci-bench");
    assert!(
        output.status.success(),
        "jetci-bench --quick failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // How long it took is for BENCHMARKS.md, not a test: timing claims live in the benchmark.
    eprintln!("jetci-bench --quick took {:?}", started.elapsed());
    let table = std::fs::read_to_string(&out).expect("BENCHMARKS.md was not written");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        table.contains("| median | p95 | floor |"),
        "no table:\n{table}"
    );
    let l_row = table
        .lines()
        .find(|l| l.starts_with("| L | commit → result") && l.contains("notify"))
        .unwrap_or_else(|| panic!("no L row:\n{table}\n{stderr}"));
    assert!(
        l_row.contains(" ms"),
        "the L row has no figure: {l_row}\n{stderr}"
    );
    assert!(
        !l_row.contains("not measured"),
        "L was not measured: {l_row}\n{stderr}"
    );
    assert!(table.contains("cores"), "no core count:\n{table}");
    for (id, start) in [
        ("W", "| W | jetci-web `/` dashboard"),
        ("W", "| W | jetci-web RSS, restarted"),
        ("D", "| D | assignments/s: backlog"),
        ("S", "| S | T as history grows"),
        ("P", "| P | an 8 s suite as 4 shards"),
        ("P", "| P | longest of 4 shards of a skewed"),
        ("F", "| F | b's commit while a has a backlog"),
    ] {
        let row = table
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {id} row starting {start:?}:\n{table}\n{stderr}"));
        assert!(
            !row.contains("not measured"),
            "{id} was not measured: {row}\n{stderr}"
        );
    }
}
