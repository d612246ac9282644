//! `coherence-bench` runs end to end on a short setting and reports what it claims.

use std::process::Command;

#[test]
fn coherence_bench_reports_events_for_the_machine_and_the_loops() {
    let dir = std::env::temp_dir().join(format!("coherence-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_coherence-bench"))
        .args([
            "--runs",
            "1",
            "--seconds",
            "0.2",
            "--ops",
            "20000",
            "--shards",
            "1,2",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("| state machine alone"), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(v["pure_events_per_s"].as_f64().unwrap() > 0.0);
    let loops = v["loops"].as_array().unwrap();
    assert_eq!(loops.len(), 2);
    for l in loops {
        assert!(l["events_per_s"].as_f64().unwrap() > 0.0, "{l}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn coherence_bench_has_help_and_rejects_bad_flags() {
    let help = Command::new(env!("CARGO_BIN_EXE_coherence-bench"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--shards"));
    let bad = Command::new(env!("CARGO_BIN_EXE_coherence-bench"))
        .args(["--shards", "0"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--shards"));
}
