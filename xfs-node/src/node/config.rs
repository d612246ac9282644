//! The cluster configuration (TOML), the same file on every node.
//!
//! ```toml
//! [cluster]
//! name = "demo"          # part of every endpoint's tag: clusters do not mix
//! version = 1            # bump on every change; nodes of another version are refused
//! transport = "udp"      # or "rdma"
//! shards = 2             # shard loops (cores) per node
//! n_chance = 2           # N-chance forwarding of last copies
//! hand_off_written = true # ...of copies only written there too (false: only read ones)
//! cache_blocks = 16384   # blocks each shard caches (4 KiB each)
//! write_back_secs = 30   # a file written and not fsynced is made durable within this
//! voters = [1, 2, 3]     # the membership log's voters (default: the first 3 nodes, or 5
//!                        # of 5 or more); the other nodes follow it as learners
//! membership = true      # false: no membership log, no fencing (a peer that stops
//!                        # answering is taken as dead by each node alone)
//!
//! [[nodes]]
//! id = 1
//! host = "127.0.0.1"
//! port = 7100            # shard s listens on port + s, the storage server on port + shards,
//!                        # the membership log on port + shards + 1
//! roles = ["client", "manager", "storage"]
//! storage = "/var/lib/xfs/node1.img"   # a file (created) or a block device
//! storage_bytes = 268435456            # size of a created file
//! control = "/run/xfs/node1.sock"      # the CLI's socket
//! # membership = "/var/lib/xfs/node1.membership"  # its copy of the membership log
//! #                      (default: beside the storage file, else the control socket;
//! #                      it must survive a reboot: a voter that loses it may vote twice)
//!
//! [manager_map]
//! version = 1
//! entries = [1, 2, 3]    # index number % len -> manager node
//!
//! [[stripe_groups]]
//! id = 0
//! servers = [1, 2, 3]    # storage nodes, data first, then parity
//! parity = 1
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::coherence::NodeId;
use crate::fs::client::{ManagerMap, ManagerMapError};
use crate::storage::cleaner::CleanerConfigError;
use crate::storage::log::{StripeGroup, StripeGroupError, StripeGroupMap};

/// Why a configuration cannot be used ([`Config::locate`], [`Config::load`],
/// [`Config::parse`], [`Config::validate`]); each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `voters = []`.
    #[error("[cluster] voters is empty: name 3 or 5 nodes (or leave it out for the first 3)")]
    NoVoters,
    /// A voter that is not a node.
    #[error("[cluster] voters names node {0}, which is not in [[nodes]]")]
    UnknownVoter(NodeId),
    /// `--data DIR` names a directory without a cluster.
    #[error(
        "{} has no cluster.toml: start a cluster there with `xfs-node up --data {}`",
        dir.display(),
        dir.display()
    )]
    NoClusterToml {
        /// The directory.
        dir: PathBuf,
    },
    /// Neither `--data` nor `--config` was given.
    #[error("say which cluster: --data DIR (a local cluster) or --config FILE")]
    NoCluster,
    /// The file cannot be read.
    #[error("cannot read the config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file's content is not a good configuration.
    #[error("{}: {source}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        #[source]
        source: Box<ConfigError>,
    },
    /// Not TOML, or not the configuration's fields.
    #[error("bad config: {0}")]
    Toml(#[source] toml::de::Error),
    /// A `[cleaner]` value.
    #[error("[cleaner] {0}")]
    Cleaner(#[from] CleanerConfigError),
    /// `[cluster] shards`.
    #[error("[cluster] shards = {0}: use 1 to 64")]
    Shards(usize),
    /// `[cluster] fragment_bytes`.
    #[error("[cluster] fragment_bytes = {0}: use a multiple of 4096, at least 8192")]
    FragmentBytes(usize),
    /// `[cluster] write_back_secs`.
    #[error(
        "[cluster] write_back_secs = {0}: use 1 to 86400 (unsynced writes are made durable \
         within this many seconds)"
    )]
    WriteBackSecs(u64),
    /// No `[[nodes]]`.
    #[error("no [[nodes]]: give at least one")]
    NoNodes,
    /// A node with id 0.
    #[error("[[nodes]] id = 0: node ids start at 1")]
    NodeIdZero,
    /// Two nodes with one id.
    #[error("[[nodes]] id = {0} appears twice")]
    DuplicateNode(NodeId),
    /// A role that does not exist.
    #[error("node {node}: unknown role {role:?} (roles are client, manager, storage)")]
    UnknownRole {
        /// The node.
        node: NodeId,
        /// The role.
        role: String,
    },
    /// A storage node without a device.
    #[error("node {0} has the storage role but no `storage = \"FILE or DEVICE\"`")]
    NoStorage(NodeId),
    /// A port too high for the node's shards.
    #[error("node {node}: port {port} leaves no room for {shards} shards")]
    Port {
        /// The node.
        node: NodeId,
        /// Its port.
        port: u16,
        /// The shards per node.
        shards: usize,
    },
    /// The manager map.
    #[error(transparent)]
    ManagerMap(#[from] ManagerMapError),
    /// The manager map names a node without the manager role.
    #[error("the manager map names node {0}, which has no manager role")]
    NotAManager(NodeId),
    /// The stripe groups.
    #[error(transparent)]
    StripeGroups(#[from] StripeGroupError),
    /// No `[[stripe_groups]]`.
    #[error("no [[stripe_groups]]: give one")]
    NoStripeGroups,
    /// A stripe group names a node without the storage role.
    #[error("stripe group {group} names node {node}, which has no storage role")]
    NotAStorageNode {
        /// The group.
        group: u32,
        /// The node.
        node: NodeId,
    },
}

/// Cluster-wide settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Cluster name.
    pub name: String,
    /// Configuration version.
    pub version: u64,
    /// The network the nodes' Active Messages run over.
    #[serde(default)]
    pub transport: TransportKind,
    /// Shard loops per node.
    #[serde(default = "default_shards")]
    pub shards: usize,
    /// N-chance forwarding count.
    #[serde(default = "default_n_chance")]
    pub n_chance: u8,
    /// N-chance offers copies written on a node (not read there) too, as xFS does (true,
    /// the default); false: only copies read where they were cached (a stream of writes
    /// then leaves its peers' caches alone: faster writes, colder reads of what it wrote).
    #[serde(default = "default_hand_off_written")]
    pub hand_off_written: bool,
    /// Blocks cached per shard.
    #[serde(default = "default_cache")]
    pub cache_blocks: usize,
    /// Fragment size on the storage servers, bytes.
    #[serde(default = "default_fragment")]
    pub fragment_bytes: usize,
    /// The periodic write-back: a file's blocks written and not fsynced are made durable
    /// once the oldest of them is this old (seconds; the kernel's dirty-page write-back
    /// is about 30 s for a local file system).
    #[serde(default = "default_write_back_secs")]
    pub write_back_secs: u64,
    /// The membership log's voters (`None`: the first 3 nodes, or 5 of 5 or more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voters: Option<Vec<NodeId>>,
    /// Whether the nodes keep a membership log and fence removed nodes (default true).
    #[serde(default = "default_membership")]
    pub membership: bool,
}

fn default_membership() -> bool {
    true
}

fn default_write_back_secs() -> u64 {
    30
}

/// The network a cluster's Active Messages run over (`[cluster] transport`). The `xfs-node`
/// binary makes the transport of this kind; the library only names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// UDP over kernel sockets (`am-udp`).
    #[default]
    Udp,
    /// RDMA verbs, reliable-connected queue pairs (`am-rdma`; RoCE or InfiniBand).
    Rdma,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Udp => "udp",
            TransportKind::Rdma => "rdma",
        })
    }
}
fn default_shards() -> usize {
    2
}
fn default_hand_off_written() -> bool {
    true
}

fn default_n_chance() -> u8 {
    2
}
fn default_cache() -> usize {
    16384
}
fn default_fragment() -> usize {
    64 * 1024
}

/// One node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Node id (1..65535).
    pub id: NodeId,
    /// Its address.
    pub host: IpAddr,
    /// First port (shards at `port + s`, the storage server at `port + shards`).
    pub port: u16,
    /// Any of `client`, `manager`, `storage`.
    pub roles: Vec<String>,
    /// The storage server's file or block device.
    #[serde(default)]
    pub storage: Option<PathBuf>,
    /// Size of a storage file created on first start.
    #[serde(default)]
    pub storage_bytes: Option<u64>,
    /// The control socket.
    pub control: PathBuf,
    /// This node's copy of the membership log (default: `node<id>.membership` beside the
    /// control socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<PathBuf>,
}

impl NodeSection {
    /// Whether the node runs `role`.
    pub fn has(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
    /// Shard `s`'s address.
    pub fn shard_addr(&self, s: usize) -> SocketAddr {
        SocketAddr::new(self.host, self.port + s as u16)
    }
    /// The storage server's address.
    pub fn storage_addr(&self, shards: usize) -> SocketAddr {
        SocketAddr::new(self.host, self.port + shards as u16)
    }
    /// The membership log's address.
    pub fn membership_addr(&self, shards: usize) -> SocketAddr {
        SocketAddr::new(self.host, self.port + shards as u16 + 1)
    }
    /// Where this node keeps its copy of the membership log: as configured, else beside
    /// its storage file (a device's: beside the control socket), which survives a reboot
    /// where a control socket's directory (`/run`) may not.
    pub fn membership_file(&self) -> PathBuf {
        self.membership.clone().unwrap_or_else(|| {
            let dir = match &self.storage {
                Some(s) if !s.starts_with("/dev") => s.parent(),
                _ => self.control.parent(),
            };
            dir.unwrap_or(Path::new("."))
                .join(format!("node{}.membership", self.id))
        })
    }
}

/// The manager map as written.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MapSection {
    /// Version.
    pub version: u64,
    /// Entries.
    pub entries: Vec<NodeId>,
}

/// A stripe group as written.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    /// Group id.
    pub id: u32,
    /// Storage nodes.
    pub servers: Vec<NodeId>,
    /// Parity fragments.
    pub parity: usize,
}

/// The whole file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Cluster settings.
    pub cluster: ClusterSection,
    /// Nodes.
    pub nodes: Vec<NodeSection>,
    /// Manager map.
    pub manager_map: MapSection,
    /// Stripe groups.
    pub stripe_groups: Vec<GroupSection>,
    /// The log cleaner (`[cleaner]`, optional: defaults in
    /// [`crate::storage::cleaner::CleanerConfig`]).
    #[serde(default)]
    pub cleaner: crate::storage::cleaner::CleanerConfig,
}

const ROLES: [&str; 3] = ["client", "manager", "storage"];

impl Config {
    /// The config of a local cluster's data directory (`data`, as given to `xfs-node up`)
    /// or of a config file; errors say what to do.
    pub fn locate(data: Option<&Path>, config: Option<&Path>) -> Result<Config, ConfigError> {
        match (data, config) {
            (Some(d), _) => {
                let p = d.join("cluster.toml");
                if !p.exists() {
                    return Err(ConfigError::NoClusterToml { dir: d.to_owned() });
                }
                Config::load(&p)
            }
            (None, Some(c)) => Config::load(c),
            (None, None) => Err(ConfigError::NoCluster),
        }
    }

    /// Read and check a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|e| ConfigError::InFile {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    /// Parse and check.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(ConfigError::Toml)?;
        c.validate()?;
        Ok(c)
    }

    /// As TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Check everything a node relies on; the error names what to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.cleaner.validate()?;
        let c = &self.cluster;
        if c.shards == 0 || c.shards > 64 {
            return Err(ConfigError::Shards(c.shards));
        }
        if c.fragment_bytes < 8192 || !c.fragment_bytes.is_multiple_of(4096) {
            return Err(ConfigError::FragmentBytes(c.fragment_bytes));
        }
        if c.write_back_secs == 0 || c.write_back_secs > 86_400 {
            return Err(ConfigError::WriteBackSecs(c.write_back_secs));
        }
        if self.nodes.is_empty() {
            return Err(ConfigError::NoNodes);
        }
        let mut ids = Vec::new();
        for n in &self.nodes {
            if n.id == 0 {
                return Err(ConfigError::NodeIdZero);
            }
            if ids.contains(&n.id) {
                return Err(ConfigError::DuplicateNode(n.id));
            }
            ids.push(n.id);
            if let Some(r) = n.roles.iter().find(|r| !ROLES.contains(&r.as_str())) {
                return Err(ConfigError::UnknownRole {
                    node: n.id,
                    role: r.clone(),
                });
            }
            if n.has("storage") && n.storage.is_none() {
                return Err(ConfigError::NoStorage(n.id));
            }
            if n.port as usize + c.shards + 1 > 65535 {
                return Err(ConfigError::Port {
                    node: n.id,
                    port: n.port,
                    shards: c.shards,
                });
            }
        }
        let voters = self.voters();
        if voters.is_empty() {
            return Err(ConfigError::NoVoters);
        }
        if let Some(v) = voters.iter().find(|v| !ids.contains(v)) {
            return Err(ConfigError::UnknownVoter(*v));
        }
        let map = self.manager_map();
        map.validate(&ids)?;
        for e in &map.entries {
            if !self.node(*e).is_some_and(|n| n.has("manager")) {
                return Err(ConfigError::NotAManager(*e));
            }
        }
        let groups = self.stripe_group_map();
        groups.validate()?;
        if groups.groups.is_empty() {
            return Err(ConfigError::NoStripeGroups);
        }
        for g in &groups.groups {
            for s in &g.servers {
                if !self.node(*s).is_some_and(|n| n.has("storage")) {
                    return Err(ConfigError::NotAStorageNode {
                        group: g.id,
                        node: *s,
                    });
                }
            }
        }
        Ok(())
    }

    /// The membership log's voters: as configured, else the first 3 nodes (5 of 5 or more;
    /// all of fewer than 3).
    pub fn voters(&self) -> Vec<NodeId> {
        if let Some(v) = &self.cluster.voters {
            return v.clone();
        }
        let mut ids: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        let n = if ids.len() >= 5 { 5 } else { ids.len().min(3) };
        ids.truncate(n);
        ids
    }

    /// Node `id`.
    pub fn node(&self, id: NodeId) -> Option<&NodeSection> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The manager map.
    pub fn manager_map(&self) -> ManagerMap {
        ManagerMap {
            version: self.manager_map.version,
            entries: self.manager_map.entries.clone(),
        }
    }

    /// The stripe-group map.
    pub fn stripe_group_map(&self) -> StripeGroupMap {
        StripeGroupMap {
            version: self.cluster.version,
            groups: self
                .stripe_groups
                .iter()
                .map(|g| StripeGroup {
                    id: g.id,
                    servers: g.servers.clone(),
                    parity: g.parity,
                })
                .collect(),
        }
    }

    /// The tag every endpoint of this cluster uses: the cluster name and the config
    /// version, so a node with another version cannot talk to this one.
    pub fn tag(&self) -> u64 {
        let mut h: u64 = 0x7846_535f_7461_6700;
        for b in self.cluster.name.bytes() {
            h = am_core::engine::splitmix(h ^ b as u64);
        }
        am_core::engine::splitmix(h ^ self.cluster.version) | 1
    }

    /// A local cluster of `n` nodes on loopback, every node in every role, storage files
    /// under `data` (used by `xfs-node up`).
    pub fn local(
        n: usize,
        data: &Path,
        transport: TransportKind,
        base_port: u16,
        storage_bytes: u64,
    ) -> Config {
        let ids: Vec<NodeId> = (1..=n as NodeId).collect();
        let shards = 2;
        Config {
            cluster: ClusterSection {
                name: "local".into(),
                version: 1,
                transport,
                shards,
                n_chance: 2,
                hand_off_written: true,
                cache_blocks: 16384,
                fragment_bytes: 64 * 1024,
                write_back_secs: default_write_back_secs(),
                voters: None,
                membership: true,
            },
            nodes: ids
                .iter()
                .map(|id| NodeSection {
                    id: *id,
                    host: IpAddr::from([127, 0, 0, 1]),
                    port: base_port + (*id - 1) * 10,
                    roles: ROLES.iter().map(|r| r.to_string()).collect(),
                    storage: Some(data.join(format!("node{id}.img"))),
                    storage_bytes: Some(storage_bytes),
                    control: data.join(format!("node{id}.sock")),
                    membership: None,
                })
                .collect(),
            manager_map: MapSection {
                version: 1,
                entries: ManagerMap::even(&ids, 16).entries,
            },
            stripe_groups: vec![GroupSection {
                id: 0,
                servers: ids.clone(),
                parity: usize::from(n > 1),
            }],
            cleaner: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_config_round_trips_and_validates() {
        let c = Config::local(3, Path::new("/tmp/x"), TransportKind::Udp, 7100, 1 << 26);
        let again = Config::parse(&c.to_toml()).unwrap();
        assert_eq!(again, c);
        assert_eq!(again.manager_map().manager(again.manager_map().root()), 1);
    }

    #[test]
    fn bad_configs_name_what_to_fix() {
        let good =
            Config::local(3, Path::new("/tmp/x"), TransportKind::Udp, 7100, 1 << 26).to_toml();
        let cases = [
            (
                good.replace("transport = \"udp\"", "transport = \"tcp\""),
                "transport",
            ),
            (good.replace("parity = 1", "parity = 3"), "parity"),
            (good.replacen("id = 2", "id = 1", 1), "appears twice"),
            ("[cluster]\nname = 1".to_string(), "bad config"),
            (
                good.replace("version = 1\nentries = [", "version = 1\nentries = [9, "),
                "node 9",
            ),
        ];
        for (text, want) in cases {
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        let twice = good.replacen("id = 2", "id = 1", 1);
        assert!(matches!(
            Config::parse(&twice),
            Err(ConfigError::DuplicateNode(1))
        ));
    }

    /// The typed errors read as the text errors they replaced (scripts and people grep
    /// them).
    #[test]
    fn error_texts_keep_their_wording() {
        let cases: Vec<(ConfigError, &str)> = vec![
            (
                ConfigError::NoClusterToml { dir: "/d".into() },
                "/d has no cluster.toml: start a cluster there with `xfs-node up --data /d`",
            ),
            (
                ConfigError::NoCluster,
                "say which cluster: --data DIR (a local cluster) or --config FILE",
            ),
            (
                ConfigError::InFile {
                    path: "/c.toml".into(),
                    source: Box::new(ConfigError::NoNodes),
                },
                "/c.toml: no [[nodes]]: give at least one",
            ),
            (ConfigError::Shards(0), "[cluster] shards = 0: use 1 to 64"),
            (
                ConfigError::WriteBackSecs(0),
                "[cluster] write_back_secs = 0: use 1 to 86400 (unsynced writes are made \
                 durable within this many seconds)",
            ),
            (
                ConfigError::NoStorage(2),
                "node 2 has the storage role but no `storage = \"FILE or DEVICE\"`",
            ),
            (
                ConfigError::Cleaner(CleanerConfigError::NoBatch),
                "[cleaner] cleaner.batch = 0: must be at least 1",
            ),
            (
                ConfigError::ManagerMap(ManagerMapError::UnknownNode(9)),
                "the manager map names node 9, which is not in [[nodes]]",
            ),
            (
                ConfigError::StripeGroups(StripeGroupError::Shape {
                    group: 0,
                    servers: 3,
                    parity: 3,
                }),
                "stripe group 0: 3 servers with 3 parity: need at least 1 data and 1 parity \
                 fragment, at most 255 in all",
            ),
            (
                ConfigError::NotAStorageNode { group: 0, node: 4 },
                "stripe group 0 names node 4, which has no storage role",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
    }
}
