//! A linearizability checker for registers (Wing & Gong's search, with Lowe's memo of
//! visited states): each file used as a register, written whole (`write` + `fsync`) and
//! read whole from several mounts, every operation recorded with its start, end and result.
//!
//! A history is linearizable when every operation can be given one instant between its
//! start and its end such that, in the order of those instants, every read returns the
//! value of the last write before it (or the initial value). Registers are independent
//! (linearizability is compositional), so each is checked alone.
//!
//! A write whose outcome is unknown (it failed, or the process stopped waiting) may have
//! taken effect at any time after its start, or never: it is given no end, and the search
//! may linearize it anywhere after its start or leave it out. A failed read tells nothing
//! and is left out of the history by the caller.

use std::collections::{BTreeMap, HashSet};

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Wrote this value (acknowledged: its `fsync` returned success, or unknown: see
    /// [`Event::end`]).
    Write(Vec<u8>),
    /// Read this value.
    Read(Vec<u8>),
}

/// One operation on one register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The register (a file name).
    pub register: String,
    /// Who did it (a mount), for the report.
    pub process: usize,
    /// What it did.
    pub op: Op,
    /// When it started (any clock common to all processes, e.g. nanoseconds since the
    /// test began).
    pub start: u64,
    /// When it returned; `None` for a write whose outcome is unknown.
    pub end: Option<u64>,
}

/// Why a history is not linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The register.
    pub register: String,
    /// The longest prefix of the history (by start) that could be linearized, and the first
    /// operation after it, as a report.
    pub why: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "register {}: {}", self.register, self.why)
    }
}

/// Most states the search visits per register before it gives up (reported as an error:
/// a history too concurrent to check, never a silent pass).
pub const MAX_STATES: usize = 5_000_000;

/// Check every register of `history`; `initial` gives each register's value before the
/// history (a register not named there starts empty). Returns the first violation found.
pub fn check(
    history: &[Event],
    initial: &BTreeMap<String, Vec<u8>>,
) -> Result<CheckReport, Violation> {
    let mut by_register: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in history {
        by_register.entry(&e.register).or_default().push(e);
    }
    let mut report = CheckReport::default();
    for (register, mut events) in by_register {
        events.sort_by_key(|e| (e.start, e.end.unwrap_or(u64::MAX)));
        let init = initial.get(register).cloned().unwrap_or_default();
        let states = check_register(&events, init).map_err(|why| Violation {
            register: register.to_string(),
            why,
        })?;
        report.registers += 1;
        report.operations += events.len();
        report.states += states;
    }
    Ok(report)
}

/// What a check covered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Registers checked.
    pub registers: usize,
    /// Operations checked.
    pub operations: usize,
    /// States the search visited.
    pub states: usize,
}

/// The search for one register: depth first over the operations that may come next (one
/// whose start is before every pending operation's end), with the set of operations done
/// and the register's value as the memo key. Returns the states visited.
fn check_register(events: &[&Event], init: Vec<u8>) -> Result<usize, String> {
    let n = events.len();
    let mut seen: HashSet<(Vec<u64>, Vec<u8>)> = HashSet::new();
    let words = n.div_ceil(64);
    // Depth-first: (done set, value, how many done).
    let mut stack: Vec<(Vec<u64>, Vec<u8>, usize)> = vec![(vec![0; words], init, 0)];
    let mut best = 0usize;
    let is_done = |d: &[u64], i: usize| d[i / 64] & (1 << (i % 64)) != 0;
    // Unknown writes need not be linearized at all.
    let required = events.iter().filter(|e| e.end.is_some()).count();
    while let Some((done, value, count)) = stack.pop() {
        let finished = (0..n)
            .filter(|i| is_done(&done, *i) && events[*i].end.is_some())
            .count();
        if finished == required {
            return Ok(seen.len());
        }
        best = best.max(count);
        if seen.len() >= MAX_STATES {
            return Err(format!(
                "the search gave up after {MAX_STATES} states ({n} operations): too concurrent \
                 to check"
            ));
        }
        // The earliest end among operations not done: nothing starting after it may come
        // before it.
        let horizon = (0..n)
            .filter(|i| !is_done(&done, *i))
            .filter_map(|i| events[i].end)
            .min()
            .unwrap_or(u64::MAX);
        for i in (0..n).rev() {
            if is_done(&done, i) || events[i].start > horizon {
                continue;
            }
            let next = match &events[i].op {
                Op::Write(v) => v.clone(),
                Op::Read(v) if *v == value => value.clone(),
                Op::Read(_) => continue,
            };
            let mut d = done.clone();
            d[i / 64] |= 1 << (i % 64);
            if seen.insert((d.clone(), next.clone())) {
                stack.push((d, next, count + 1));
            }
        }
    }
    // No order works: name the first operation the longest linearizable prefix could not
    // take.
    let culprit = events
        .iter()
        .filter(|e| e.end.is_some())
        .nth(best.min(required.saturating_sub(1)))
        .map(|e| describe(e))
        .unwrap_or_default();
    Err(format!(
        "not linearizable: at most {best} of {n} operations could be ordered; near {culprit}"
    ))
}

/// An event as a line of a report (values as text).
fn describe(e: &Event) -> String {
    let (kind, v) = match &e.op {
        Op::Write(v) => ("write", v),
        Op::Read(v) => ("read", v),
    };
    let text = String::from_utf8_lossy(v);
    format!(
        "{kind} {:?} by process {} from {} to {}",
        text.trim_end_matches('.'),
        e.process,
        e.start,
        e.end.map_or("unknown".to_string(), |x| x.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(process: usize, op: Op, start: u64, end: Option<u64>) -> Event {
        Event {
            register: "r".into(),
            process,
            op,
            start,
            end,
        }
    }
    fn w(v: &str) -> Op {
        Op::Write(v.as_bytes().to_vec())
    }
    fn r(v: &str) -> Op {
        Op::Read(v.as_bytes().to_vec())
    }

    #[test]
    fn sequential_and_overlapping_histories_pass() {
        let h = vec![
            ev(0, w("a"), 0, Some(10)),
            ev(1, r("a"), 11, Some(12)),
            // Overlapping write and read: the read may see either value.
            ev(0, w("b"), 20, Some(30)),
            ev(1, r("a"), 21, Some(25)),
            ev(1, r("b"), 26, Some(35)),
        ];
        let rep = check(&h, &BTreeMap::new()).unwrap();
        assert_eq!(rep.operations, 5);
    }

    #[test]
    fn a_stale_read_after_an_acknowledged_write_is_found() {
        let h = vec![
            ev(0, w("a"), 0, Some(10)),
            ev(0, w("b"), 11, Some(20)),
            // Starts after b was acknowledged, returns a: stale.
            ev(1, r("a"), 21, Some(22)),
        ];
        let e = check(&h, &BTreeMap::new()).unwrap_err();
        assert_eq!(e.register, "r");
    }

    #[test]
    fn a_lost_acknowledged_write_is_found_and_an_unknown_one_may_be_either() {
        let init = BTreeMap::from([("r".to_string(), b"0".to_vec())]);
        // The acknowledged write must show.
        let lost = vec![ev(0, w("a"), 0, Some(10)), ev(1, r("0"), 11, Some(12))];
        assert!(check(&lost, &init).is_err());
        // A write with no known outcome may have happened, or not.
        let unknown = vec![ev(0, w("a"), 0, None), ev(1, r("0"), 11, Some(12))];
        assert!(check(&unknown, &init).is_ok());
        let unknown = vec![ev(0, w("a"), 0, None), ev(1, r("a"), 11, Some(12))];
        assert!(check(&unknown, &init).is_ok());
        // But not before it started.
        let early = vec![ev(1, r("a"), 0, Some(5)), ev(0, w("a"), 6, None)];
        assert!(check(&early, &init).is_err());
        // And reads must not go back to the older value once the newer was read.
        let flip = vec![
            ev(0, w("a"), 0, None),
            ev(1, r("a"), 11, Some(12)),
            ev(1, r("0"), 13, Some(14)),
        ];
        assert!(check(&flip, &init).is_err());
    }
}
