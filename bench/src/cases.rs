//! What is measured: message classes and sizes, modes and wait modes.

use serde::Serialize;
use std::fmt;

/// Message class of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Small with no arguments.
    Small0,
    /// Small with 8 arguments.
    Small8,
    /// Medium with a payload.
    Medium,
    /// Bulk into the receiver's segment.
    Bulk,
}

/// One class and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    /// The class.
    pub class: Class,
    /// Payload bytes (64 for `Small8`: its arguments; 0 for `Small0`).
    pub size: usize,
}

impl Case {
    /// Small, 0 arguments.
    pub const SMALL0: Case = Case {
        class: Class::Small0,
        size: 0,
    };
    /// Small, 8 arguments.
    pub const SMALL8: Case = Case {
        class: Class::Small8,
        size: 64,
    };
    /// A medium of `n` bytes.
    pub fn medium(n: usize) -> Case {
        Case {
            class: Class::Medium,
            size: n,
        }
    }
    /// A bulk of `n` bytes.
    pub fn bulk(n: usize) -> Case {
        Case {
            class: Class::Bulk,
            size: n,
        }
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.class {
            Class::Small0 => write!(f, "small/0 args"),
            Class::Small8 => write!(f, "small/8 args"),
            Class::Medium => write!(f, "medium/{}", human(self.size)),
            Class::Bulk => write!(f, "bulk/{}", human(self.size)),
        }
    }
}

/// 1024 -> "1 KiB".
pub fn human(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

/// Round-trip latency cases.
pub fn latency_cases(quick: bool) -> Vec<Case> {
    let mut v = vec![Case::SMALL0, Case::SMALL8];
    for n in [64, 1024, 4096, 8192] {
        v.push(Case::medium(n));
    }
    v.push(Case::bulk(64 << 10));
    v.push(Case::bulk(1 << 20));
    if !quick {
        v.push(Case::bulk(16 << 20));
    }
    v
}

/// Streaming bandwidth cases.
pub fn bandwidth_cases(quick: bool) -> Vec<Case> {
    let mut v = vec![Case::medium(1024), Case::medium(8192), Case::bulk(64 << 10)];
    if !quick {
        v.push(Case::bulk(1 << 20));
    }
    v.push(Case::bulk(16 << 20));
    v
}

/// How a side waits for its next event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Wait {
    /// Busy-polling.
    Poll,
    /// Sleeping in epoll (or a blocking receive).
    Block,
}

impl Wait {
    /// "poll" or "block".
    pub fn name(self) -> &'static str {
        match self {
            Wait::Poll => "poll",
            Wait::Block => "block",
        }
    }
    /// Parses "poll" or "block".
    pub fn parse(s: &str) -> Option<Wait> {
        match s {
            "poll" => Some(Wait::Poll),
            "block" => Some(Wait::Block),
            _ => None,
        }
    }
}
