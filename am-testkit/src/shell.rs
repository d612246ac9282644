//! Shell helpers for tests that set up the host: commands, required tools, `nft` drop
//! rules in network namespaces.

use anyhow::{anyhow, bail};

/// Runs `cmd` with `sh -c`: its stdout, or an error naming the command and what it said.
pub fn sh(cmd: &str) -> anyhow::Result<String> {
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map_err(|e| anyhow!("{cmd}: {e}"))?;
    if !o.status.success() {
        bail!(
            "`{cmd}` failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Fails the test, naming the package to install, when `tool` is not on the PATH.
pub fn need(tool: &str, package: &str) {
    assert!(
        sh(&format!("command -v {tool}")).is_ok(),
        "`{tool}` is missing: install it with `apt-get install -y {package}` (as root)"
    );
}

/// In network namespace `ns`, an nft table `table` dropping `percent`% of UDP datagrams at
/// each hook of `hooks` (`input`, `output`), counting what it drops.
pub fn nft_drop_udp(ns: &str, table: &str, percent: u32, hooks: &[&str]) -> anyhow::Result<()> {
    sh(&format!("ip netns exec {ns} nft 'add table inet {table}'"))?;
    for hook in hooks {
        sh(&format!(
            "ip netns exec {ns} nft 'add chain inet {table} {hook} {{ type filter hook {hook} priority 0 ; policy accept ; }}'"
        ))?;
        sh(&format!(
            "ip netns exec {ns} nft 'add rule inet {table} {hook} meta l4proto udp numgen random mod 100 < {percent} counter drop'"
        ))?;
    }
    Ok(())
}

/// Datagrams the rules of [`nft_drop_udp`] dropped so far (0 when the table is gone).
pub fn nft_dropped(ns: &str, table: &str) -> u64 {
    let text = sh(&format!("ip netns exec {ns} nft list table inet {table}")).unwrap_or_default();
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "packets")
        .filter_map(|w| w[1].parse::<u64>().ok())
        .sum()
}
