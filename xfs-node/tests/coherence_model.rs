//! Model checking of the coherence protocol (`tests/model/`): the bounded check that CI runs,
//! the ordered-network check, the xFS deadlock found in the variant without sequence numbers,
//! and a deeper check behind `XFS_MODEL_DEEP=1` (or `--ignored`).

mod model;

use std::time::{Duration, Instant};

use model::{CoherenceModel, World};
use stateright::{Checker, HasDiscoveries, Model};
use xfs_node::coherence::Msg;
use xfs_node::coherence::ProtocolConfig;

fn check(m: CoherenceModel, min_states: usize, unreachable: &[&str]) {
    check_within(m, min_states, unreachable, None)
}

/// Check `m` exhaustively, or for at most `budget` (then the search is incomplete, and says
/// so).
fn check_within(
    m: CoherenceModel,
    min_states: usize,
    unreachable: &[&str],
    budget: Option<Duration>,
) {
    let t = Instant::now();
    let desc = format!("{m:?}");
    let mut builder = m
        .checker()
        .symmetry_fn(CoherenceModel::representative)
        .threads(2);
    if let Some(b) = budget {
        builder = builder.timeout(b);
    }
    let checker = builder.spawn_dfs().join();
    let states = checker.unique_state_count();
    let complete = budget.is_none_or(|b| t.elapsed() < b);
    eprintln!(
        "model {desc}: {states} unique states, max depth {}, {:.1} s, {}",
        checker.max_depth(),
        t.elapsed().as_secs_f64(),
        if complete {
            "complete"
        } else {
            "INCOMPLETE: the time budget ran out first"
        }
    );
    for p in checker.model().properties() {
        if p.name.starts_with("txn:") && checker.model().txns == 0 {
            continue;
        }
        let found = checker.discovery(p.name);
        match p.expectation {
            stateright::Expectation::Sometimes if unreachable.contains(&p.name) => {}
            stateright::Expectation::Sometimes => {
                assert!(found.is_some(), "no example of `{}` found", p.name)
            }
            _ => {
                if let Some(path) = found {
                    panic!("`{}` violated:\n{}", p.name, describe(path.into_vec()));
                }
            }
        }
    }
    assert!(
        states >= min_states,
        "explored only {states} states, expected at least {min_states}: the bounds shrank"
    );
}

fn describe(path: Trace) -> String {
    let mut s = String::new();
    for (i, (w, a)) in path.iter().enumerate() {
        if let Some(a) = a {
            let what = match a {
                model::Action::Deliver(k) => format!("deliver {:?}", w.net[*k]),
                other => format!("{other:?}"),
            };
            s.push_str(&format!("{i:3}: {what}\n"));
        }
    }
    if let Some((w, _)) = path.last() {
        s.push_str(&format!("final: violation {:?}\n", w.violation));
    }
    s
}

fn model(clients: usize, blocks: usize, ops: u8, ordered: bool, capacity: usize) -> CoherenceModel {
    CoherenceModel {
        clients,
        blocks,
        ops_per_client: ops,
        ordered,
        config: ProtocolConfig::default(),
        capacity,
        updates: false,
        txns: 0,
    }
}

/// Breadth first (a shortest trace; no symmetry reduction) until a `no deadlock`
/// violation: its path and the states explored, or `None` if there is none.
/// A path of the model: each state and the action taken from it.
type Trace = Vec<(World, Option<model::Action>)>;

fn shortest_deadlock(m: CoherenceModel) -> Option<(Trace, usize)> {
    let checker = m
        .checker()
        .threads(2)
        .finish_when(HasDiscoveries::AnyOf(["no deadlock"].into_iter().collect()))
        .spawn_bfs()
        .join();
    let path = checker.discovery("no deadlock")?;
    Some((path.into_vec(), checker.unique_state_count()))
}

fn deep() -> bool {
    std::env::var_os("XFS_MODEL_DEEP").is_some()
}

/// The race of Figure 2 needs three clients (a holder, a reader, a writer).
const NEEDS_THREE: &[&str] = &["a revoke overtakes a forward"];

#[test]
fn two_clients_one_block_unordered_network() {
    check(model(2, 1, 4, false, 0), 400_000, NEEDS_THREE);
}

#[test]
fn two_clients_one_block_ordered_network() {
    check(model(2, 1, 4, true, 0), 100_000, NEEDS_THREE);
}

#[test]
fn three_clients_one_block_unordered_network() {
    check(model(3, 1, 2, false, 0), 100_000, &[]);
}

/// Atomic updates (the read-modify-write every metadata change is made of) lose nothing:
/// the value each update starts from is the last completed write or update.
#[test]
fn two_clients_one_block_with_atomic_updates() {
    let mut m = model(2, 1, 4, false, 0);
    m.updates = true;
    check(m, 1_000_000, NEEDS_THREE);
}

/// Two-block transactions (what a rename across directories is made of: acquire both
/// buckets in block order, pinning each, change both, release): no transaction ever sees
/// the two blocks differ (another one's change half done), and nothing deadlocks. With one
/// sequence-number channel per client (not per client and block) this deadlocked: a pinned
/// block deferred a forwarded read, and the reader's channel then held back the revoke of
/// a block the first transaction waited for.
#[test]
fn two_block_transactions_are_atomic_and_deadlock_free() {
    let mut m = model(2, 2, 2, false, 0);
    m.txns = 1;
    check(
        m,
        10_000,
        &[
            "a revoke overtakes a forward",
            "a write-back before a forward",
            "a peer-served read races a revoke",
            "an eviction forwarded",
        ],
    );
}

/// The same with three clients (a holder, a reader, a second transaction): one operation
/// each in CI; two each under `XFS_MODEL_DEEP=1` (6.4 M states, about 2 minutes).
#[test]
fn three_clients_two_block_transactions() {
    let ops = if deep() { 2 } else { 1 };
    let mut m = model(3, 2, ops, false, 0);
    m.txns = 1;
    check(
        m,
        if deep() { 1_000_000 } else { 5_000 },
        &[
            "a write-back before a forward",
            "a peer-served read races a revoke",
            "an eviction forwarded",
            "a revoke overtakes a forward",
        ],
    );
}

/// With one client acquiring in the other order the checker finds the deadlock (each
/// holds the block the other waits for): why blocks are acquired in increasing order.
#[test]
fn transactions_acquiring_out_of_order_deadlock() {
    let mut m = model(2, 2, 1, false, 0);
    m.txns = 2;
    let (steps, _) = shortest_deadlock(m).expect("acquiring in opposite orders must deadlock");
    let last = &steps.last().expect("a path has states").0;
    assert!(last.net.is_empty(), "a deadlock has nothing in flight");
    assert!(
        last.txn.iter().all(|t| *t == 3),
        "both wait for their second block:\n{}",
        describe(steps.clone())
    );
}

/// 5.1 M states, about 90 s on 2 cores: behind `XFS_MODEL_DEEP=1`.
#[test]
fn deep_three_clients_one_block_with_atomic_updates() {
    if !deep() {
        eprintln!("SKIPPED: set XFS_MODEL_DEEP=1 for 3 clients with updates (90 s)");
        return;
    }
    let mut m = model(3, 1, 2, false, 0);
    m.updates = true;
    check(m, 100_000, &[]);
}

#[test]
fn two_clients_two_blocks_capacity_one() {
    check(model(2, 2, 2, false, 1), 100_000, NEEDS_THREE);
}

/// 3 clients x 2 blocks with a cache of one block (so a miss evicts the other block): too
/// large to finish here (over 15 minutes on 2 cores), so it runs for
/// `XFS_MODEL_DEEP_SECS` (default 600) and reports whether it finished.
#[test]
fn deep_three_clients_two_blocks() {
    if !deep() {
        eprintln!("SKIPPED: set XFS_MODEL_DEEP=1 for 3 clients x 2 blocks (minutes)");
        return;
    }
    let secs: u64 = std::env::var("XFS_MODEL_DEEP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    check_within(
        model(3, 2, 2, false, 1),
        1_000_000,
        &[],
        Some(Duration::from_secs(secs)),
    );
}

/// The protocol without the manager's sequence numbers (clients handle manager messages as
/// they come and queue what they are not ready for) deadlocks: the checker must find the
/// xFS paper's Figure 2, a revoke overtaking a forward at the sole cacher.
#[test]
fn without_sequence_numbers_the_checker_finds_the_figure_2_deadlock() {
    let t = Instant::now();
    let mut m = model(3, 1, 2, false, 0);
    m.config.sequenced = false;
    // Breadth first, so the trace is a shortest one (no symmetry reduction there).
    let (steps, states) = shortest_deadlock(m)
        .expect("the checker must find the deadlock of the unsequenced protocol");
    let trace = describe(steps.clone());
    eprintln!(
        "deadlock found after {states} states in {:.1} s:\n{trace}",
        t.elapsed().as_secs_f64()
    );
    // Its shape: some client got a Revoke while a Forward the manager sent it earlier was
    // still in flight, and at the end every operation waits with nothing in flight.
    let overtaken = steps.iter().any(|(w, a)| {
        let Some(model::Action::Deliver(k)) = a else {
            return false;
        };
        let e = &w.net[*k];
        let model::Payload::Proto(Msg::Revoke { .. }) = e.payload else {
            return false;
        };
        w.net.iter().any(|f| {
            f.to == e.to && matches!(f.payload, model::Payload::Proto(Msg::Forward { .. }))
        })
    });
    assert!(
        overtaken,
        "the deadlock should start with a revoke overtaking a forward:\n{trace}"
    );
    let last = &steps.last().expect("a path has states").0;
    assert!(
        last.net.is_empty(),
        "a deadlock has nothing in flight:\n{trace}"
    );
    assert!(CoherenceModel::pending(last));
}
