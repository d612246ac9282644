//! `xfs-node status`: every node's state, the manager map, the stripe groups with their
//! space and cleaner.

use xfs_node::fs::client::ManagerMap;
use xfs_node::node::config::{Config, GroupSection, NodeSection};
use xfs_node::node::control::{NodeStatus, Request, Response};
use xfs_node::storage::cleaner::CleanerStatus;

use crate::control;

/// Node `id`'s status, over its control socket.
pub(crate) fn status_of(cfg: &Config, id: u16) -> Result<NodeStatus, String> {
    match control(cfg, id)?
        .call_ok(&Request::Status)
        .map_err(|e| e.to_string())?
    {
        Response::Status(s) => Ok(*s),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Print the cluster's state (`counters`: and every node's counters).
pub(crate) fn print_status(cfg: &Config, counters: bool) -> Result<(), String> {
    let map = cfg.manager_map();
    println!(
        "cluster {:?} (config version {}, transport {}, {} shards per node)",
        cfg.cluster.name, cfg.cluster.version, cfg.cluster.transport, cfg.cluster.shards
    );
    println!(
        "{:<5} {:<8} {:<22} {:<24} {:>9} {:>14}  state",
        "node", "pid", "address", "roles", "managers", "storage used"
    );
    let mut down_nodes = Vec::new();
    let mut statuses = Vec::new();
    for n in &cfg.nodes {
        match status_of(cfg, n.id) {
            Ok(s) => {
                print_node(n, &s, &map, counters);
                statuses.push(s);
            }
            Err(_) => {
                down_nodes.push(n.id);
                print_down_node(n, &map);
            }
        }
    }
    println!(
        "manager map v{}: {} entries",
        map.version,
        map.entries.len()
    );
    if let Some(m) = statuses
        .iter()
        .map(|s| &s.membership)
        .filter(|m| m.enabled)
        .max_by_key(|m| m.epoch)
    {
        let out = non_members(m);
        println!(
            "membership: epoch {}, leader {}, voters {:?}{}",
            m.epoch,
            m.leader.map_or("none known".to_string(), |l| l.to_string()),
            m.voters,
            if out.is_empty() {
                String::new()
            } else {
                format!(", not members: {}", out.join(", "))
            }
        );
    }
    for g in &cfg.stripe_groups {
        print_group(g, &statuses, &down_nodes);
    }
    Ok(())
}

/// How many of the manager map's entries node `n` manages, as `k/entries`.
fn managed(n: &NodeSection, map: &ManagerMap) -> String {
    let managed = map.entries.iter().filter(|e| **e == n.id).count();
    format!("{managed}/{}", map.entries.len())
}

/// A node that answered: its row of the table (and its counters, if asked).
fn print_node(n: &NodeSection, s: &NodeStatus, map: &ManagerMap, counters: bool) {
    println!(
        "{:<5} {:<8} {:<22} {:<24} {:>9} {:>14}  {}{}",
        n.id,
        s.pid,
        format!("{}:{}", n.host, n.port),
        n.roles.join(","),
        managed(n, map),
        format!(
            "{}/{} MiB",
            s.storage_used_bytes >> 20,
            s.storage_total_bytes >> 20
        ),
        if s.ready { "ready" } else { "starting" },
        if s.counter("log_servers_down") > 0 {
            ", log degraded (a storage server is down)"
        } else {
            ""
        }
    );
    if counters {
        for (k, v) in &s.counters {
            println!("      {k} = {v}");
        }
    }
}

/// A node that did not answer: its row of the table.
fn print_down_node(n: &NodeSection, map: &ManagerMap) {
    println!(
        "{:<5} {:<8} {:<22} {:<24} {:>9} {:>14}  DOWN",
        n.id,
        "-",
        format!("{}:{}", n.host, n.port),
        n.roles.join(","),
        managed(n, map),
        "-"
    );
}

/// Stripe group `g`: its servers (degraded if any is down), its space and its cleaner as
/// the group's leader reports them.
fn print_group(g: &GroupSection, statuses: &[NodeStatus], down_nodes: &[u16]) {
    let lost: Vec<_> = g
        .servers
        .iter()
        .filter(|s| down_nodes.contains(s))
        .collect();
    println!(
        "stripe group {}: servers {:?}, {} data + {} parity{}",
        g.id,
        g.servers,
        g.servers.len() - g.parity,
        g.parity,
        if lost.is_empty() {
            String::new()
        } else {
            format!(", DEGRADED (down: {lost:?})")
        }
    );
    let led = statuses.iter().find_map(|s| {
        s.cleaners
            .iter()
            .find(|(id, l, st)| *id == g.id && *l == Some(s.node) && st.is_some())
            .and_then(|(_, _, st)| st.clone().map(|st| (s.node, st)))
    });
    match led {
        Some((leader, s)) => {
            print_space(g, &s, statuses);
            print_cleaner(leader, &s);
        }
        None => println!("  cleaner: no leader has reported yet"),
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Group `g`'s space as its cleaner `s` counts it, and what new data fits.
fn print_space(g: &GroupSection, s: &CleanerStatus, statuses: &[NodeStatus]) {
    // What new data may take: the least any of the group's nodes reports (its
    // statfs, which `df` on a mount through it shows): the free segments less
    // the checkpoints' and the cleaner's reserve.
    let fits = statuses
        .iter()
        .filter(|n| g.servers.contains(&n.node) && n.storage_total_bytes > 0)
        .map(|n| n.storage_total_bytes.saturating_sub(n.storage_used_bytes))
        .min();
    println!(
        "  space: {:.1} MiB free of {:.1} MiB ({} of {} segments), {:.1} MiB live, {:.1} MiB cleanable{}",
        mib(s.free_segments * s.segment_payload),
        mib(s.total_segments * s.segment_payload),
        s.free_segments,
        s.total_segments,
        mib(s.live_bytes),
        mib(s.cleanable_bytes),
        fits.map_or(String::new(), |f| format!(
            "; {:.1} MiB fits new data (as df reports, the rest is reserve)",
            mib(f)
        ))
    );
}

/// The group's cleaner, led by node `leader`: its state and totals.
fn print_cleaner(leader: u16, s: &CleanerStatus) {
    println!(
        "  cleaner: led by node {leader}, {}{}; {} segments cleaned, {:.1} MiB moved, {} copies discarded (writer won), {} segments freed{}",
        s.state,
        if s.state.starts_with("cleaning") {
            format!(" (round: {} of {} segments)", s.progress.0, s.progress.1)
        } else {
            String::new()
        },
        s.segments_cleaned,
        mib(s.bytes_moved),
        s.discarded,
        s.freed,
        if s.last_error.is_empty() {
            String::new()
        } else {
            format!("; last error: {}", s.last_error)
        }
    );
}

/// `xfs-node members`: the membership as node `node` applied it.
pub(crate) fn print_members(cfg: &Config, node: u16) -> Result<(), String> {
    let s = status_of(cfg, node)?;
    let m = &s.membership;
    if !m.enabled {
        println!("node {node}: no membership log ([cluster] membership = false)");
        return Ok(());
    }
    println!(
        "epoch {} (as node {node} applied it), term {}, leader {}, voters {:?}",
        m.epoch,
        m.term,
        m.leader.map_or("none known".to_string(), |l| l.to_string()),
        m.voters
    );
    println!(
        "manager map changed in epoch {}, stripe groups in epoch {}",
        m.managers_epoch, m.stripe_groups_epoch
    );
    println!(
        "{:<5} {:<8} {:>6} {:>22}",
        "node", "state", "since", "incarnation"
    );
    for (n, inc, state, since) in &m.members {
        println!("{n:<5} {state:<8} {since:>6} {inc:>22}");
    }
    let failed = non_members(m);
    if !failed.is_empty() {
        println!("not members: {}", failed.join(", "));
    }
    if !m.last_error.is_empty() {
        println!("last error: {}", m.last_error);
    }
    Ok(())
}

/// The nodes the membership names that are not members, as `node (state)`.
fn non_members(m: &xfs_node::membership::MembershipStatus) -> Vec<String> {
    m.members
        .iter()
        .filter(|(_, _, st, _)| st != "active")
        .map(|(n, _, st, _)| format!("{n} ({st})"))
        .collect()
}
