//! am-bench runs end to end and writes the rows scripts read.

use std::process::Command;

fn run(args: &[&str]) -> serde_json::Value {
    let dir = std::env::temp_dir().join(format!(
        "am-bench-smoke-{}-{}",
        std::process::id(),
        args.len()
    ));
    let json = dir.join("rows.json");
    let out = Command::new(env!("CARGO_BIN_EXE_am-bench"))
        .args(args)
        .args([
            "--no-peers",
            "--out",
            dir.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "am-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(dir.join("am-bench.md").exists());
    let _ = std::fs::remove_dir_all(&dir);
    rows
}

#[test]
fn help_names_the_modes() {
    let out = Command::new(env!("CARGO_BIN_EXE_am-bench"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for w in [
        "latency",
        "bandwidth",
        "rate",
        "poll",
        "block",
        "--quick",
        "--json",
    ] {
        assert!(text.contains(w), "--help lacks {w}");
    }
}

#[test]
fn rdma_without_a_device_says_what_to_run_and_peers_are_not_silently_skipped() {
    if am_testkit::rdma::unavailable().is_none() {
        eprintln!("a verbs device is present: the no-device message is not checked here");
    } else {
        let out = Command::new(env!("CARGO_BIN_EXE_am-bench"))
            .args(["--transport", "rdma", "--no-peers"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--transport rdma:") && err.contains("bash bench/run-verbs.sh"),
            "{err}"
        );
    }
    // Without --no-peers, a machine lacking the peer tools is an error naming the packages
    // (an empty PATH stands in for a bare machine).
    let out = Command::new(env!("CARGO_BIN_EXE_am-bench"))
        .args(["--quick"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "without --no-peers the missing peers must be an error"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("apt-get install -y sockperf ucx-utils libfabric-bin qperf"),
        "{err}"
    );
}

#[test]
fn udp_and_sim_rows_with_raw_ratios() {
    let rows = run(&[
        "--quick", "--wait", "block", "--iters", "200", "--warmup", "20", "--bw-mib", "4",
    ]);
    let rows = rows.as_array().unwrap();
    let find = |system: &str, transport: &str, mode: &str| {
        rows.iter()
            .filter(|r| r["system"] == system && r["transport"] == transport && r["mode"] == mode)
            .collect::<Vec<_>>()
    };
    let am_lat = find("am", "udp", "latency");
    let raw_lat = find("raw-udp", "udp", "latency");
    assert!(
        am_lat.len() >= 7 && raw_lat.len() >= 5,
        "{} {}",
        am_lat.len(),
        raw_lat.len()
    );
    for r in &am_lat {
        assert_eq!(r["wait"], "block");
        assert!(r["p50_us"].as_f64().unwrap() > 0.0);
        assert!(r["p99_us"].as_f64().unwrap() >= r["p50_us"].as_f64().unwrap());
    }
    // Small and medium rows are ratios against raw UDP of the same size.
    assert!(am_lat[0]["vs_raw"].as_f64().unwrap() > 0.0);
    let bw = find("am", "udp", "bandwidth");
    assert!(!bw.is_empty() && bw.iter().all(|r| r["mb_per_s"].as_f64().unwrap() > 0.0));
    let rate = find("am", "udp", "rate");
    assert_eq!(rate.len(), 1);
    assert!(rate[0]["msgs_per_s"].as_f64().unwrap() > 0.0);
    let sim = find("am", "sim", "latency");
    assert!(!sim.is_empty() && sim.iter().all(|r| r["vs_raw"].is_null()));
}

#[test]
fn dpdk_rows_against_raw_dpdk_in_the_same_run() {
    // Two processes over net_memif (root; DPDK installed: the error names the packages).
    let rows = run(&[
        "--transport",
        "dpdk",
        "--quick",
        "--wait",
        "poll",
        "--mode",
        "latency,rate",
        "--iters",
        "300",
        "--warmup",
        "30",
        "--max-size",
        "1024",
    ]);
    let rows = rows.as_array().unwrap();
    let find = |system: &str, mode: &str| {
        rows.iter()
            .filter(|r| r["system"] == system && r["transport"] == "dpdk" && r["mode"] == mode)
            .collect::<Vec<_>>()
    };
    let raw = find("raw-dpdk", "latency");
    let am = find("am", "latency");
    assert!(
        raw.len() >= 2 && am.len() >= 3,
        "{} {}",
        raw.len(),
        am.len()
    );
    for r in &am {
        // A ratio against the raw row of the same size exists (its value is the
        // benchmark's business, not a smoke test's: this runs beside other tests).
        let ratio = r["vs_raw"].as_f64().expect("a ratio against raw DPDK");
        assert!(ratio.is_finite() && ratio > 0.0, "{r}");
        assert!(r["note"].as_str().unwrap().contains("raw DPDK"));
    }
    let raw_rate = find("raw-dpdk", "rate");
    let am_rate = find("am", "rate");
    assert_eq!((raw_rate.len(), am_rate.len()), (1, 1));
    assert!(raw_rate[0]["msgs_per_s"].as_f64().unwrap() > 1000.0);
    assert!(am_rate[0]["vs_raw"].as_f64().unwrap() > 0.0);
}
