//! The file system on top of the coherence protocol: block layout and patches
//! ([`layout`]), and the client API ([`client`]).

pub mod clean_sim;
pub mod client;
pub mod fsck;
pub mod layout;
pub mod sim;
